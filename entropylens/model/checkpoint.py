"""The one model-folder writer: safetensors + config + tokenizer, loadable by `AutoModelForCausalLM.from_pretrained`.

The model cache (dequantised built-in weights) and the trainer's checkpoints both write through it; by hand,
because a model loaded from GGUF refuses `save_pretrained`.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from entropylens.errors import UserError
from entropylens.model.layout import module_path


def tied_head_key(model: torch.nn.Module) -> str | None:
    """State-dict key of the output embedding when it shares storage with the input embedding."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return None
    path = module_path(model, head)
    return None if path is None else f"{path}.weight"


def save_checkpoint(model: torch.nn.Module, tokenizer, path: str | Path, state: dict | None = None, *,
                    generation_config: bool = True, keep_existing: bool = False) -> Path:
    """The one model-folder writer: safetensors + config (+ generation config) + tokenizer, loadable by
    `AutoModelForCausalLM.from_pretrained`, written whole into a per-process temporary folder then renamed.

    By hand because GGUF-loaded models refuse save_pretrained. `state` replaces `model.state_dict()` when
    the parameters are sharded (FSDP's gathered full state). A tied output embedding is left out (transformers
    re-ties it). `keep_existing`: another process that finished first keeps its folder (the model cache).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # per process: sharded ranks may race here
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = tied_head_key(model)
    if tied is None and getattr(model.config, "tie_word_embeddings", False):
        tied = "lm_head.weight"  # tied by the config: the reload re-ties it from the input embedding
    state = model.state_dict() if state is None else state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items() if k != tied}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    quant = getattr(config, "quantization_config", None)
    if quant is not None:  # GGUF weights are dequantised in memory; any other scheme we cannot write
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        if method != "gguf":
            raise UserError("cannot save a quantized (non-GGUF) model's weights as a plain checkpoint")
        del config.quantization_config  # else the reload claims to be quantized and refuses training/saving
    config.save_pretrained(tmp)
    if generation_config:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if keep_existing and (path / "model.safetensors").is_file():
        shutil.rmtree(tmp)
        return path
    shutil.rmtree(path, ignore_errors=True)  # a previous or damaged folder
    os.replace(tmp, path)
    return path


def save_dequantised(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    """The model cache's folder of a GGUF-loaded model (`save_checkpoint`; the first process to finish wins)."""
    save_checkpoint(model, tokenizer, folder, generation_config=False, keep_existing=True)
