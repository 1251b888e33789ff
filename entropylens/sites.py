"""The five sites of a decoder layer, found generically in any HF causal LM (DESIGN §1).

    a_in^l = input_layernorm(H^{l-1})   -> site `attn_in`
    A^l    = self_attn(a_in^l)          -> site `attn`
    f_in^l = post_attention_layernorm(H^{l-1} + A^l)   -> site `ffn_in`
    F^l    = mlp(f_in^l)                -> site `ffn`
    H^l    = H^{l-1} + A^l + F^l        -> site `layer`

Layers are 1-indexed as in the paper; H^0 (the input of the first layer) is stored as layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropylens.errors import UserError

SITES = ("attn_in", "attn", "ffn_in", "ffn", "layer")

# Attribute names tried in order; the first one present wins.
LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
SITE_MODULES = {
    "attn_in": ("input_layernorm", "ln_1", "attention_norm", "ln1"),
    "attn": ("self_attn", "attn", "attention"),
    "ffn_in": ("post_attention_layernorm", "ln_2", "ffn_norm", "ln2"),
    "ffn": ("mlp", "feed_forward", "ffn"),
}
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")
# Layers with extra norms around the residual branches change what A^l and F^l mean: refuse them loudly.
UNSUPPORTED_EXTRAS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")


def _get(root: torch.nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Layout:
    """Where the sites live in one model: module paths relative to the model root."""

    layers_path: str  # e.g. "model.layers"
    site_names: dict[str, str]  # site -> attribute name inside a decoder layer
    final_norm_path: str
    n_layers: int

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(model, self.layers_path)

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return _get(model, self.final_norm_path)


def find_layout(model: torch.nn.Module) -> Layout:
    """Find decoder layers, their four sub-modules and the final norm, or say exactly what is missing."""
    arch = type(model).__name__
    layers_path = next((p for p in LAYER_LISTS if isinstance(_get(model, p), torch.nn.ModuleList)), None)
    if layers_path is None:
        tried = ", ".join(LAYER_LISTS)
        raise UserError(f"unsupported architecture {arch}: no decoder layer list found (tried {tried})")
    first = _get(model, layers_path)[0]
    extras = [n for n in UNSUPPORTED_EXTRAS if hasattr(first, n)]
    if extras:
        raise UserError(
            f"unsupported architecture {arch}: its layers have {', '.join(extras)}, so A^l and F^l are not "
            "plain residual branches; entropylens does not trace this layout yet"
        )
    names = {}
    for site, candidates in SITE_MODULES.items():
        name = next((c for c in candidates if isinstance(getattr(first, c, None), torch.nn.Module)), None)
        if name is None:
            raise UserError(
                f"unsupported architecture {arch}: no {site} module in {layers_path}[0] "
                f"(tried {', '.join(candidates)}; found {', '.join(n for n, _ in first.named_children())})"
            )
        names[site] = name
    final = next((p for p in FINAL_NORMS if isinstance(_get(model, p), torch.nn.Module)), None)
    if final is None:
        raise UserError(f"unsupported architecture {arch}: no final norm found (tried {', '.join(FINAL_NORMS)})")
    return Layout(layers_path, names, final, len(_get(model, layers_path)))


@dataclass
class Activations:
    """Everything one traced forward captures, all (B, T, d) on the model's device."""

    h0: torch.Tensor  # (B, T, d) input of layer 1
    sites: dict[str, list[torch.Tensor]]  # site -> L tensors (B, T, d)
    final_normed: torch.Tensor  # (B, T, d) final_norm(H^L): the model's own head input

    def stacked(self, site: str) -> torch.Tensor:
        return torch.stack(self.sites[site])  # (L, B, T, d)


def first_tensor(x) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first element is the hidden state."""
    return x[0] if isinstance(x, (tuple, list)) else x


def additivity_error(acts: Activations) -> float:
    """max |H^l - (H^{l-1} + A^l + F^l)| / max |H^l|: ~1e-7 in fp32 for a plain pre-norm residual stream."""
    prev, worst, scale = acts.h0.double(), 0.0, 0.0
    for a, f, h in zip(acts.sites["attn"], acts.sites["ffn"], acts.sites["layer"]):
        h = h.double()
        worst = max(worst, (h - (prev + a.double() + f.double())).abs().max().item())
        scale = max(scale, h.abs().max().item())
        prev = h
    return worst / max(scale, 1e-30)
