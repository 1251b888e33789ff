"""Trainer: update == REINFORCE with baseline, the internal phase freezes what it must, files are right."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny import make_char_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

from entropylens.bupo.rollout import generate_rollouts
from entropylens.bupo.checkpoint import save_checkpoint
from entropylens.bupo.trainer import (
    BupoConfig, _no_grad_logp, _score_chunk, _update, set_phase, train,
)
from entropylens.errors import UserError
from entropylens.analysis.stages import pick_boundary_layer

TEXTS = ["1+2=", "what is 40+2?", "7*6"]
EXPECTED_KEYS = {"step", "phase", "reward/mean", "reward/std", "entropy/layer_k", "entropy/output",
                 "kl/output_vs_internal", "clip/frac", "optim/grad_norm", "completion/len_mean",
                 "perf/tokens_per_s", "loss", "signal/groups_frac", "signal/tokens", "update/logp_before",
                 "update/logp_after", "update/adv_logp_gain"}


def length_reward(text: str, answer: str) -> float:  # varies across rollouts of a random model
    return float(len(text))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _changed(model, before, prefix):
    return [n for n, p in model.named_parameters() if n.startswith(prefix) and not torch.equal(p, before[n])]


def _cfg(**kw):
    base = dict(internal_layer=1, internal_steps=1, steps=1, prompts_per_step=2, num_generations=4,
                max_new_tokens=6, learning_rate=1e-2, weight_decay=0.1, micro_batch_size=3)
    return BupoConfig(**{**base, **kw})


def test_internal_phase_leaves_upper_layers_and_final_norm_bit_identical(tmp_path, char_tokenizer, prompts):
    model = make_char_llama(layers=3).requires_grad_(False)  # as entropylens.model.load.load_model hands it over
    before = _snapshot(model)
    train(_cfg(internal_layer=2), model, char_tokenizer, prompts, tmp_path / "run", progress=False,
          reward_fn=length_reward)
    assert not _changed(model, before, "model.layers.2.") and not _changed(model, before, "model.norm.")
    for prefix in ("model.layers.0.", "model.layers.1.", "lm_head.", "model.embed_tokens."):
        assert _changed(model, before, prefix), prefix
    assert not any(p.requires_grad for p in model.parameters())  # flags restored


def test_after_the_switch_every_layer_moves_and_files_are_written(tmp_path, char_tokenizer, prompts):
    model = make_char_llama(layers=3)
    before = _snapshot(model)
    ckpt = train(_cfg(steps=2, internal_steps=1), model, char_tokenizer, prompts, tmp_path / "run", progress=False,
                 reward_fn=length_reward)
    for prefix in ("model.layers.0.", "model.layers.1.", "model.layers.2.", "model.norm.", "lm_head."):
        assert _changed(model, before, prefix), prefix
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["internal", "output"] and [r["step"] for r in rows] == [0, 1]
    assert all(set(r) == EXPECTED_KEYS for r in rows)
    assert all(r["reward/std"] > 0 and r["entropy/layer_k"] > 0 for r in rows)
    assert all(r["kl/output_vs_internal"] >= 0 and r["clip/frac"] == 0 for r in rows)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kind"] == "bupo" and manifest["status"] == "complete" and manifest["bupo"]["layer"] == 1
    assert manifest["bupo"]["objective"] == "entropylens" and manifest["bupo"]["mini_batches"] == 1
    assert manifest["model"]["n_layers"] == 3 and manifest["config"]["internal_steps"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 2
    assert ckpt == tmp_path / "run" / "checkpoint" and (ckpt / "model.safetensors").is_file()


def _reinforce_grads(model, ro, adv, k, temperature):
    """Independent: -(1/N_tok) sum adv * mask * log pi(token), pi = output policy or softmax(H^k W_U^T)."""
    model.zero_grad(set_to_none=True)
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([ro.prompt_mask, torch.ones_like(ro.completion_ids)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    logits = out.logits if k is None else out.hidden_states[k] @ model.lm_head.weight.T
    lp = F.log_softmax(logits[:, P - 1 : P + T - 1].double() / temperature, -1)
    lp = lp.gather(-1, ro.completion_ids[..., None])[..., 0]
    (-(adv[:, None] * ro.mask * lp).sum() / ro.mask.sum()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("phase", ["internal", "output"])
def test_one_update_gradient_equals_reinforce_with_baseline(model, char_tokenizer, phase):
    cfg = _cfg(internal_layer=2, temperature=0.8, micro_batch_size=4)  # 6 rollouts -> uneven micro-batches
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, cfg.temperature, 6, seed=0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.25, 2.0, 0.0])
    set_phase(model, cfg.internal_layer, phase)
    model.zero_grad(set_to_none=True)
    stats = _update(model, ro, adv, None, None, cfg, phase)
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert stats["clipped"] == 0  # ratio exactly 1: nothing clipped
    set_phase(model, cfg.internal_layer, "output")
    k = cfg.internal_layer if phase == "internal" else None
    ref = _reinforce_grads(model, ro, adv, k, cfg.temperature)
    assert set(got) == set(ref)
    if phase == "internal":
        assert not any(n.startswith(("model.layers.2.", "model.norm.")) for n in got)
    for n in ref:
        assert torch.allclose(got[n].double(), ref[n].double(), atol=1e-6, rtol=1e-4), n


def test_separate_old_logprob_pass_gives_ratio_exactly_one(model, char_tokenizer):
    cfg = _cfg(micro_batch_size=4)
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 6, seed=0)
    for phase in ("internal", "output"):
        old = _no_grad_logp(model, ro, cfg, phase)
        new = torch.cat([_score_chunk(model, ro, cfg.internal_layer, s, phase, 1.0)[0].detach()
                         for s in (slice(0, 4), slice(4, 8))])
        assert torch.equal(torch.exp(new - old), torch.ones_like(old))


def test_paper_recipe_runs_and_takes_one_step_per_mini_batch(tmp_path, char_tokenizer, prompts, monkeypatch):
    """--objective paper --mini-batches 2: two AdamW steps per batch, recorded in the manifest; the loss itself is
    checked against the authors' code in test_peer_objective.py."""
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (steps.append(1), real_step(self, *a, **k))[1])
    cfg = _cfg(steps=2, internal_steps=1, objective="paper", mini_batches=2, weight_decay=0.01)
    train(cfg, make_char_llama(layers=3), char_tokenizer, prompts, tmp_path / "run", progress=False,
          reward_fn=length_reward)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["bupo"]["objective"] == "paper" and manifest["bupo"]["mini_batches"] == 2
    assert len(steps) == 2 * 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(set(r) == EXPECTED_KEYS and math.isfinite(r["loss"]) for r in rows)


def test_kl_and_multiple_iterations_run(tmp_path, char_tokenizer, prompts):
    model = make_char_llama()
    cfg = _cfg(steps=2, beta=0.1, num_iterations=2, loss_agg="seq_mean_token_mean")
    train(cfg, model, char_tokenizer, prompts, tmp_path / "run", progress=False, reward_fn=length_reward)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_reloads_with_same_logits(tmp_path, char_tokenizer, tied):
    model = make_char_llama(tied=tied)
    path = save_checkpoint(model, char_tokenizer, tmp_path / "checkpoint")
    again = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, again(ids).logits, atol=1e-6)
    assert (again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()) == tied
    assert AutoTokenizer.from_pretrained(path)("7*6").input_ids == char_tokenizer("7*6").input_ids


def test_checkpoint_of_a_gguf_derived_model_is_not_marked_quantized(tmp_path, char_tokenizer):
    model = make_char_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    path = save_checkpoint(model, char_tokenizer, tmp_path / "checkpoint")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert getattr(AutoModelForCausalLM.from_pretrained(path), "hf_quantizer", None) is None
    assert model.config.quantization_config["quant_method"] == "gguf"  # the live model is untouched


def test_failed_run_is_marked_failed(tmp_path, char_tokenizer, prompts):
    def broken(text, answer):
        raise RuntimeError("reward exploded")

    with pytest.raises(RuntimeError):
        train(_cfg(), make_char_llama(), char_tokenizer, prompts, tmp_path / "run", progress=False, reward_fn=broken)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "reward exploded" in manifest["error"]


def test_bad_config_is_a_user_error(tmp_path, char_tokenizer, prompts):
    with pytest.raises(UserError):
        train(_cfg(internal_layer=4), make_char_llama(layers=3), char_tokenizer, prompts, tmp_path, progress=False)
    with pytest.raises(UserError):
        train(_cfg(loss_agg="sum"), make_char_llama(), char_tokenizer, prompts, tmp_path, progress=False)


def test_pick_boundary_layer():
    table = pd.DataFrame({"layer": [0, 1, 2, 3, 4, 5], "dH_ffn": [float("nan"), 0.3, -0.1, 0.2, -0.4, -0.05]})
    k, evidence = pick_boundary_layer(table.sample(frac=1, random_state=0))
    assert k == 3 and "layer 3 of 5" in evidence and "+0.200" in evidence
    with pytest.raises(UserError):
        pick_boundary_layer(table.assign(dH_ffn=-1.0))
    with pytest.raises(UserError):
        pick_boundary_layer(table.rename(columns={"dH_ffn": "dH"}))


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_no_signal_steps_are_logged_as_such_and_move_nothing(tmp_path, char_tokenizer, prompts):
    model = make_char_llama()
    before = _snapshot(model)
    # no weight decay: AdamW would shrink the weights even with zero gradients (as in TRL; momentum does too)
    train(_cfg(steps=2, weight_decay=0.0), model, char_tokenizer, prompts, tmp_path / "run", progress=False,
          reward_fn=lambda t, a: 1.0)
    for r in _rows(tmp_path / "run"):
        assert r["signal/groups_frac"] == 0.0 and r["signal/tokens"] == 0 and r["optim/grad_norm"] == 0.0
        if r["phase"] == "internal":
            assert r["update/logp_after"] == r["update/logp_before"] and r["update/adv_logp_gain"] == 0.0
        else:  # measured in the internal phase only
            assert r["update/logp_after"] is None and r["update/adv_logp_gain"] is None
    assert not _changed(model, before, "")


def test_signal_counts_groups_and_tokens_with_advantage(tmp_path, char_tokenizer, prompts):
    # only the prompt whose answer is "3" has rewards that differ within its group
    train(_cfg(steps=2, prompts_per_step=4), make_char_llama(), char_tokenizer, prompts, tmp_path / "run",
          progress=False, reward_fn=lambda t, a: float(len(t)) if a == "3" else 0.0)
    for r in _rows(tmp_path / "run"):
        assert r["signal/groups_frac"] == 0.25  # 1 group of 4 per step (each step is one epoch of the 4 prompts)
        total = r["completion/len_mean"] * 4 * 4
        assert 0 < r["signal/tokens"] < total


@pytest.mark.parametrize("phase", ["internal", "output"])
def test_update_effect_is_the_trained_policy_before_and_after_the_step(model, char_tokenizer, phase):
    from entropylens.bupo.trainer import _update_effect

    cfg = _cfg(internal_layer=2, micro_batch_size=4)
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 6, seed=0)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0])  # 3 prompts x G = 2
    set_phase(model, cfg.internal_layer, phase)
    ref_before = _no_grad_logp(model, ro, cfg, phase)  # (N, T) independent forward before the step
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    kept: list[torch.Tensor] = []
    _update(model, ro, adv, None, None, cfg, phase, keep_logp=kept)
    opt.step()
    ref_after = _no_grad_logp(model, ro, cfg, phase)
    effect = _update_effect(model, ro, adv, torch.cat(kept), cfg, phase)
    signal, lp_before, lp_after, gain = (effect[k] for k in ("signal_tokens", "logp_before", "logp_after", "adv_gain"))
    m = ro.mask
    assert signal == float((m * (adv != 0)[:, None]).sum())
    assert lp_before == pytest.approx(float((ref_before * m).sum()), rel=1e-5)
    assert lp_after == pytest.approx(float((ref_after * m).sum()), rel=1e-5)
    assert gain == pytest.approx(float((adv[:, None] * (ref_after - ref_before) * m).sum()), rel=1e-4, abs=1e-6)
    assert gain > 0  # a small step on the surrogate raises the better-than-average samples' log-probs
