"""Lenses built from tiny random models equal the distributions computed with the modules themselves."""

from __future__ import annotations

import pytest
import torch

from entropylens.core.decode import decode_rows
from entropylens.errors import UserError
from entropylens.core.lens import make_lens

V, D = 96, 32


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(logits.double(), -1)
    return -(lp.exp() * lp).sum(-1)


def llama(head_bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        m.model.norm.weight.uniform_(0.5, 2.0)  # a non-trivial gain, so folding it into W is tested
        if head_bias:
            m.lm_head = torch.nn.Linear(D, V, bias=True)
    return m, m.model.norm


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=1, n_head=4, n_positions=64)).eval()
    with torch.no_grad():
        m.transformer.ln_f.weight.uniform_(0.5, 2.0)
        m.transformer.ln_f.bias.normal_(0, 0.5)
    return m, m.transformer.ln_f


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=V, hidden_size=D, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, head_dim=8, final_logit_softcapping=3.0)
    m = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)  # logits well past the cap, so tanh matters
    return m, m.model.norm


@pytest.mark.parametrize("build", [llama, gpt2], ids=["rmsnorm", "layernorm"])
def test_logit_lens_equals_final_norm_then_head(build):
    model, norm = build()
    x = torch.randn(20, D) * 3 + 1  # non-zero mean: LayerNorm's centring matters
    with torch.no_grad():
        want = entropy_of(model.get_output_embeddings()(norm(x)))
    lens = make_lens("logit", model, norm)
    assert lens.norm_kind == ("rms" if build is llama else "layer")
    got = decode_rows(x, lens, chunk=40)
    assert (got.entropy - want).abs().max() < 1e-4


def test_bupo_lens_is_head_alone_with_bias():
    model, norm = llama(head_bias=True)
    x = torch.randn(20, D) * 3
    with torch.no_grad():
        logits = model.lm_head(x)
    lens = make_lens("bupo", model, norm)
    assert lens.bias is not None and lens.norm_kind is None
    got = decode_rows(x, lens, targets=torch.arange(20), chunk=40)
    assert (got.entropy - entropy_of(logits)).abs().max() < 1e-4
    want_lt = torch.log_softmax(logits.double(), -1)[torch.arange(20), torch.arange(20)]
    assert (got.logp_target - want_lt).abs().max() < 1e-4
    assert torch.equal(got.top1, logits.argmax(-1))


def test_softcap_applied():
    model, norm = gemma2()
    x = torch.randn(20, D)
    with torch.no_grad():
        raw = model.lm_head(x)
    capped = 3.0 * torch.tanh(raw / 3.0)
    lens = make_lens("bupo", model, norm)
    assert lens.softcap == 3.0
    got = decode_rows(x, lens, chunk=40)
    assert (got.entropy - entropy_of(capped)).abs().max() < 1e-4
    assert (got.entropy - entropy_of(raw)).abs().max() > 1e-2  # the cap changes the answer here


def test_centring_keeps_distributions_but_shrinks_logits():
    model, norm = llama()
    lens = make_lens("bupo", model, norm)
    assert lens.W.mean(0).abs().max() < 1e-5
    x = torch.randn(8, D)
    with torch.no_grad():
        want = entropy_of(model.lm_head(x))
    assert (entropy_of(lens.logits(x)) - want).abs().max() < 1e-5


def test_unknown_lens_and_unreadable_norm_are_user_errors():
    model, norm = llama()
    with pytest.raises(UserError):
        make_lens("tuned", model, norm)
    with pytest.raises(UserError):
        make_lens("logit", model, torch.nn.Identity())
