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

Every lens is defined once, in the registry below (`register_lens`): the tracer, `entropylens.decode`, the NDIF
path and the trainer's pi^k all build from it. A lens of your own (a tuned lens, a temperature) is one
`register_lens` call with a builder that returns such an affine `Lens`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entropylens.core.lse import MASKED
from entropylens.errors import UserError


@dataclass
class Lens:
    name: str
    W: torch.Tensor  # (V, d) fp32, effective unembedding (the live parameters when built with live=True)
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
        trainer's pi^k on a live lens (raw residuals give logits near +-100, hence fp32 at least; fp64 stays)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        bias = None if self.bias is None else self.bias.to(dt)
        s = self.row_scale(x.reshape(-1, x.shape[-1]))
        if s is None:
            z = F.linear(x.to(dt), self.W.to(dt), bias)
        else:
            z = F.linear(x.to(dt), self.W.to(dt)) * s.reshape(x.shape[:-1])[..., None]
            z = z if bias is None else z + bias
        return z if not self.softcap else self.softcap * torch.tanh(z / self.softcap)


def finish_logits(z: torch.Tensor, lens: Lens, scale: torch.Tensor | None, c0: int) -> torch.Tensor:
    """Raw chunk logits (R, C) of ids [c0, c0 + C) -> final logits, in place: row scale, bias, soft-cap."""
    if scale is not None:
        z.mul_(scale[:, None])
    if lens.bias is not None:
        z.add_(lens.bias[c0 : c0 + z.shape[1]].to(z.device, z.dtype).clamp_min(MASKED))
    if lens.softcap:
        z.div_(lens.softcap).tanh_().mul_(lens.softcap)
    return z


def softcap_of(config) -> float | None:
    """The final logit soft-cap c (z -> c·tanh(z / c)) a model config declares, or None."""
    return getattr(config, "final_logit_softcapping", None)


def read_head(model: torch.nn.Module) -> tuple[torch.nn.Module, float | None]:
    """What every lens reads from a model: the output embedding (weight W_U (V, d), optional bias) and the
    soft-cap. The registry's builders and remote traces all read it here."""
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embedding (lm_head); not a causal LM")
    return head, softcap_of(model.config)


# ---------------------------------------------------------------- the registry

Builder = Callable[[torch.nn.Module, "torch.nn.Module | None", bool], Lens]


@dataclass(frozen=True)
class LensSpec:
    """One lens: its name, how it is built from a model's head (and final norm), and what it reads."""

    name: str
    build: Builder  # (model, final_norm or None, live) -> Lens; live: on the parameters as they are (gradients)
    reads_final_norm: bool  # the trainer keeps the final norm trainable in pi^k's phase when True
    remote: str | None = None  # how the NDIF body computes it: "unembed" | "norm-unembed"; None: local only
    doc: str = ""


LENSES: dict[str, LensSpec] = {}
BOTH = ("bupo", "logit")  # `--lens both`


def register_lens(name: str, build: Builder, *, reads_final_norm: bool, remote: str | None = None,
                  doc: str = "") -> LensSpec:
    """Add a lens every part of entropylens can use by name (`--lens NAME`, `decode(lens=NAME)`, pi^k)."""
    if not name or not name.replace("_", "").replace("-", "").isalnum() or name == "both":
        raise ValueError(f"a lens name is letters, digits, '_' or '-' (not 'both'), got {name!r}")
    if remote not in (None, "unembed", "norm-unembed"):
        raise ValueError(f"remote must be None, 'unembed' or 'norm-unembed', got {remote!r}")
    LENSES[name] = spec = LensSpec(name, build, reads_final_norm, remote, doc)
    return spec


def lens_spec(name: str) -> LensSpec:
    if name not in LENSES:
        raise UserError(f"unknown lens {name!r}; choose {', '.join(LENSES)} or both")
    return LENSES[name]


def lens_names(choice: str) -> list[str]:
    """The lenses a `--lens` value names: one registered lens, or `both` = bupo and logit."""
    return list(BOTH) if choice == "both" else [lens_spec(choice).name]


def make_lens(name: str, model: torch.nn.Module, final_norm: torch.nn.Module | None = None, *,
              live: bool = False) -> Lens:
    """Build registered lens `name` from the model's own head (weights, bias, soft-cap) and final norm.
    `live=False`: a detached fp32 copy for decoding (centred over V where that changes no distribution);
    `live=True`: on the parameters as they are, so gradients reach them (the trainer's pi^k; under FSDP build
    it where the parameters are in place, inside the head's forward)."""
    spec = lens_spec(name)
    if spec.reads_final_norm and final_norm is None:
        raise UserError(f"lens {name!r} needs the model's final norm: pass the model, not a bare (V, d) unembedding")
    return spec.build(model, final_norm, live)


def _head_params(model: torch.nn.Module, live: bool) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """(W_U (V, d), bias or None, soft-cap): the parameters themselves when live, else detached fp64 copies."""
    head, softcap = read_head(model)
    W, bias = head.weight, getattr(head, "bias", None)
    if not live:
        W, bias = W.detach().double(), None if bias is None else bias.detach().double()
    return W, bias, softcap


def _affine(name: str, W: torch.Tensor, bias: torch.Tensor | None, softcap: float | None, kind: str | None,
            eps: float, live: bool) -> Lens:
    if live:
        return Lens(name, W, bias, softcap, kind, eps)
    if not softcap:
        W = W - W.mean(0, keepdim=True)  # per-row shift of every logit: softmax unchanged
    return Lens(name, W.float(), None if bias is None else bias.float(), softcap, kind, eps)


def _norm_params(norm: torch.nn.Module, d: int, live: bool) -> tuple[str, torch.Tensor, torch.Tensor | None, float]:
    """Read (kind, gain g, bias b, eps) of a final norm, then check the reading against the module itself."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    w = getattr(norm, "weight", None)
    if eps is None or w is None:
        raise UserError(f"logit lens: cannot read eps/weight of final norm {type(norm).__name__}")
    if w.device.type == "meta":
        raise UserError("logit lens: the device map offloads the final norm to disk; map it to cpu or a GPU")
    kind = "layer" if isinstance(norm, torch.nn.LayerNorm) else "rms"
    gemma = type(norm).__name__.startswith("Gemma")  # Gemma's RMSNorm multiplies by (1 + weight)
    g = w.detach().double()
    if gemma:
        g = g + 1.0
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
    if live:
        g, b = (w + 1.0 if gemma else w), getattr(norm, "bias", None)
    return kind, g, b, float(eps)


def _bupo(model: torch.nn.Module, final_norm: torch.nn.Module | None, live: bool) -> Lens:
    W, bias, softcap = _head_params(model, live)
    return _affine("bupo", W, bias, softcap, None, 0.0, live)


def _logit(model: torch.nn.Module, final_norm: torch.nn.Module | None, live: bool) -> Lens:
    W, bias, softcap = _head_params(model, live)
    kind, g, b, eps = _norm_params(final_norm, W.shape[1], live)
    W_eff = W * g  # W_U diag(g)
    if kind == "layer":
        W_eff = W_eff - W_eff.mean(-1, keepdim=True)
        if b is not None:
            extra = W @ b  # (V,)
            bias = extra if bias is None else bias + extra
    return _affine("logit", W_eff, bias, softcap, kind, eps, live)


register_lens("bupo", _bupo, reads_final_norm=False, remote="unembed",
              doc="softmax(x W_U^T): the unembedding alone, no final norm (the paper's)")
register_lens("logit", _logit, reads_final_norm=True, remote="norm-unembed",
              doc="softmax(final_norm(x) W_U^T): the classical logit lens, the norm recomputed per vector")
