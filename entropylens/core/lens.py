"""Lenses: every lens here is affine per row, z(x) = s(x) · (x W^T) + c, then the head's soft-cap.

- `bupo`  (the paper's convention): W = W_U, s = 1, c = head bias. No final norm.
- `logit` (classical logit lens): the final norm recomputed for each vector and folded into W.
  RMSNorm:   norm(x) = x / rms(x) ⊙ g              ->  W = W_U diag(g),  s = 1 / rms(x)
  LayerNorm: norm(x) = (x - μ) / σ ⊙ g + b         ->  W = centre(W_U diag(g)),  s = 1 / σ(x),  c += W_U b
  (centring is linear: (x - μ1)·w = x·(w - mean(w)1), so it folds into the rows of W).
Softmax ignores a per-row shift, so W is centred over the vocabulary (W − mean_v W_v) when there is no
soft-cap: this shrinks raw-residual logits (massive activations reach |z| ~ 4e4 in SmolLM2) and with them
the fp32 rounding, without changing any distribution. Because x ↦ x W^T is linear, the raw logits of
H^l = H^{l-1} + A^l + F^l are the sums of the raw
logits of the three terms: the decode engine uses that to skip the `layer` GEMM (docs/definitions.md#computation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entropylens.errors import UserError
from entropylens.store.schema import LENSES  # the stored vocabulary: one list, importable without torch


@dataclass
class Lens:
    name: str
    W: torch.Tensor  # (V, d) fp32, effective unembedding (the live parameter in `live_lens`)
    bias: torch.Tensor | None  # (V,) fp32, added after the row scale
    softcap: float | None  # final logit soft-capping: z -> c·tanh(z / c)
    norm_kind: str | None  # None (bupo), "rms" or "layer"
    eps: float = 0.0

    def row_scale(self, x: torch.Tensor) -> torch.Tensor | None:
        """s(x) for rows x (N, d), computed in fp64 then rounded; None for the bupo lens."""
        if self.norm_kind is None:
            return None
        x = x.double()
        if self.norm_kind == "rms":
            var = x.pow(2).mean(-1)
        else:
            var = x.var(-1, unbiased=False)
        return torch.rsqrt(var + self.eps).float()  # (N,)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Plain full-vocabulary logits (N, V) in x's dtype — for references and small inputs only."""
        W = self.W.to(x.dtype)
        z = x @ W.T
        s = self.row_scale(x)
        if s is not None:
            z = z * s.to(x.dtype)[:, None]
        if self.bias is not None:
            z = z + self.bias.to(x.dtype)
        if self.softcap:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def logits_fp32(self, x: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (..., V) of x (..., d) in fp32, differentiable in x and in W / bias: the
        trainer's pi^k on `live_lens` (raw residuals give logits near +-100, hence fp32 at least; fp64 stays)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dt)
        s = self.row_scale(x.reshape(-1, x.shape[-1]))
        if s is None:
            z = F.linear(x.to(dt), self.W.to(dt), bias)
        else:
            z = F.linear(x.to(dt), self.W.to(dt)) * s.reshape(x.shape[:-1])[..., None]
            z = z if bias is None else z + bias
        return z if not self.softcap else self.softcap * torch.tanh(z / self.softcap)


def softcap_of(config) -> float | None:
    """The final logit soft-cap c (z -> c·tanh(z / c)) a model config declares, or None."""
    return getattr(config, "final_logit_softcapping", None)


def read_head(model: torch.nn.Module) -> tuple[torch.nn.Module, float | None]:
    """What every lens reads from a model: the output embedding (weight W_U (V, d), optional bias) and the
    soft-cap. The tracer (`make_lens`), the trainer (`live_lens`) and remote traces all read it here."""
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embedding (lm_head); not a causal LM")
    return head, softcap_of(model.config)


def live_lens(model: torch.nn.Module) -> Lens:
    """Lens `bupo` on the model's parameters as they are now (not copied, not centred, so gradients reach
    W_U): the trainer's pi^k = softmax(H^k W_U^T + b), the same distribution `make_lens("bupo", ...)` decodes.
    Build it where the parameters are in place (under FSDP: inside the head's forward)."""
    head, cap = read_head(model)
    return Lens("bupo", head.weight, getattr(head, "bias", None), cap, None)


def _norm_params(norm: torch.nn.Module, d: int) -> tuple[str, torch.Tensor, torch.Tensor | None, float]:
    """Read (kind, gain g, bias b, eps) of a final norm, then check the reading against the module itself."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    w = getattr(norm, "weight", None)
    if eps is None or w is None:
        raise UserError(f"logit lens: cannot read eps/weight of final norm {type(norm).__name__}")
    if w.device.type == "meta":
        raise UserError("logit lens: the device map offloads the final norm to disk; map it to cpu or a GPU")
    kind = "layer" if isinstance(norm, torch.nn.LayerNorm) else "rms"
    g = w.detach().double()
    if type(norm).__name__.startswith("Gemma"):
        g = g + 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
    b = getattr(norm, "bias", None)
    b = b.detach().double() if b is not None else None
    # Verify: our closed form must reproduce the module on random inputs, else refuse (no silent mismatch).
    x = torch.randn(8, d, dtype=torch.float64, device=w.device) * 3
    if kind == "rms":
        ours = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g
    else:
        ours = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps) * g
        ours = ours + (b if b is not None else 0)
    with torch.no_grad():
        theirs = norm(x.to(w.dtype)).double()
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not torch.allclose(ours, theirs, rtol=tol, atol=tol * theirs.abs().max().item()):
        raise UserError(f"logit lens: final norm {type(norm).__name__} is neither RMSNorm nor LayerNorm as read")
    return kind, g, b, float(eps)


def make_lens(name: str, model: torch.nn.Module, final_norm: torch.nn.Module) -> Lens:
    """Build lens `name` from the model's own head (weights, bias, soft-cap) and final norm."""
    if name not in LENSES:
        raise UserError(f"unknown lens {name!r}; choose bupo, logit or both")
    head, softcap = read_head(model)
    W = head.weight.detach().double()  # (V, d)
    hb = getattr(head, "bias", None)
    bias = hb.detach().double() if hb is not None else None
    kind, eps = None, 0.0
    W_eff = W  # (V, d)
    if name == "logit":
        kind, g, b, eps = _norm_params(final_norm, W.shape[1])
        W_eff = W * g  # W_U diag(g)
        if kind == "layer":
            W_eff = W_eff - W_eff.mean(-1, keepdim=True)
            if b is not None:
                extra = W @ b  # (V,)
                bias = extra if bias is None else bias + extra
    if not softcap:
        W_eff = W_eff - W_eff.mean(0, keepdim=True)  # per-row shift of every logit: softmax unchanged
    return Lens(name, W_eff.float(), None if bias is None else bias.float(), softcap, kind, eps)
