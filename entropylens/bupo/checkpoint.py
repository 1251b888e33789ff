"""What a training run leaves on disk: the final checkpoint (safetensors + config + tokenizer, loadable by
`AutoModelForCausalLM.from_pretrained`) and the resumable state (`state.pt`: weights, optimizer, RNG, step,
prompt order and the metrics so far), each written crash-safe so a killed run never leaves half a file;
and how Ctrl-C stops a run: after the step in progress, with the state saved.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from entropylens.errors import UserError
from entropylens.store import write_atomic

STATE_FILE = "state.pt"


def tied_head_key(model: nn.Module) -> str | None:
    """State-dict key of the output embedding when it shares storage with the input embedding."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight.data_ptr() != emb.weight.data_ptr():
        return None
    for name, module in model.named_modules():
        if module is head:
            return f"{name}.weight"
    return None


def save_checkpoint(model: nn.Module, tokenizer, path: str | Path, state: dict | None = None) -> Path:
    """Write safetensors + config + tokenizer (works for GGUF-loaded models, which refuse save_pretrained).

    `state` replaces `model.state_dict()` when the parameters are sharded (FSDP's gathered full state).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tied = tied_head_key(model)
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
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def save_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, *, step: int, rng: random.Random,
               order: list[int], metrics: list[dict], n_tokens: int, config: dict) -> None:
    """Everything needed to continue after `step` completed steps exactly as an uninterrupted run would.

    One file, replaced atomically: a kill while saving leaves the previous state. Sampling is seeded per
    step (`group_seed`), so the weights, AdamW moments, prompt order and step are all the loop depends on;
    torch's RNG state is kept too, for anything that draws from it (dropout).
    """
    state = {
        "step": step, "n_tokens": n_tokens, "config": config, "metrics": metrics,
        "rng": rng.getstate(), "order": list(order), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "model": model.state_dict(), "optimizer": opt.state_dict(),
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer, config: dict) -> dict[str, Any]:
    """Restore weights, optimizer and RNG from `save_state`'s file; return its bookkeeping (step, order, ...)."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain Python values only
    changed = sorted(k for k in config if k in state["config"] and state["config"][k] != config[k])
    if changed:
        raise UserError(f"{path} was saved with other settings ({', '.join(changed)}); resume with the stored ones")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    rng = random.Random()
    rng.setstate(state["rng"])
    return {"step": state["step"], "n_tokens": state["n_tokens"], "metrics": state["metrics"], "rng": rng,
            "order": state["order"]}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: raised after the step in progress finished and the state was saved."""

    def __init__(self, step: int, saved: bool):
        super().__init__(f"interrupted after step {step}" + (" (state saved)" if saved else ""))
        self.step, self.saved = step, saved


@contextmanager
def deferred_sigint(enabled: bool):
    """While training, a first Ctrl-C only raises a flag (the step in progress finishes, then the state is
    saved); a second one interrupts at once. Off under a launcher, where ranks must stop together."""
    flag = {"hit": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag["hit"]:
            raise KeyboardInterrupt
        flag["hit"] = True
        tqdm.write("Ctrl-C: finishing this step and saving the training state (Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
