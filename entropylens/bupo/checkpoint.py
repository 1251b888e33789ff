"""What a training run leaves on disk: the final checkpoint (`entropylens.model.checkpoint.save_checkpoint`, the writer
the model cache uses too: safetensors + config + tokenizer, loadable by `AutoModelForCausalLM.from_pretrained`)
and the resumable state (`state.pt`: weights, optimizer, RNG, step,
prompt order and the metrics so far), each written crash-safe so a killed run never leaves half a file;
and how Ctrl-C stops a run: after the step in progress, with the state saved.
"""

from __future__ import annotations

import random
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from entropylens.errors import UserError
from entropylens.model.checkpoint import save_checkpoint  # noqa: F401  (the trainer writes its checkpoint here)
from entropylens.store import write_atomic

STATE_FILE = "state.pt"


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
def deferred_sigint(enabled: bool, console: Console | None = None):
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
        (console or Console(stderr=True)).print("Ctrl-C: finishing this step and saving the training state "
                                               "(Ctrl-C again to stop now)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
