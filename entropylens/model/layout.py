"""The five sites of a decoder layer, found generically in any HF causal LM (docs/definitions.md#sites).

    a_in^l = input_layernorm(H^{l-1})   -> site `attn_in`
    A^l    = self_attn(a_in^l)          -> site `attn`
    f_in^l = post_attention_layernorm(H^{l-1} + A^l)   -> site `ffn_in`
    F^l    = mlp(f_in^l)                -> site `ffn`
    H^l    = H^{l-1} + A^l + F^l        -> site `layer`

Layers are 1-indexed as in the paper; H^0 (the input of the first layer) is stored as layer 0.

Gemma 2 / 3 layers norm each branch on both sides ("sandwich" layout):

    H' = H^{l-1} + post_attention_layernorm(self_attn(input_layernorm(H^{l-1})))
    H^l = H' + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(H')))

There `attn` / `ffn` are the branches' additive contributions (the post-norm outputs), `attn_in` / `ffn_in`
the normed inputs the branches read, so H^l = H^{l-1} + A^l + F^l holds as in the plain layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from entropylens.errors import UserError
from entropylens.core.lens import read_head
from entropylens.store.schema import SITES  # noqa: F401  (re-exported: the stored vocabulary, one list, no torch)


# Attribute names tried in order; the first one present wins.
LAYER_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "transformer.layers")
SITE_MODULES = {
    "attn_in": ("input_layernorm", "ln_1", "attention_norm", "ln1"),
    "attn": ("self_attn", "attn", "attention"),
    "ffn_in": ("post_attention_layernorm", "ln_2", "ffn_norm", "ln2"),
    "ffn": ("mlp", "feed_forward", "ffn"),
}
FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")
# Gemma 2 / 3: every branch between a pre-norm and a post-norm; the sites are the norms' outputs.
SANDWICH_MODULES = {
    "attn_in": "input_layernorm",
    "attn": "post_attention_layernorm",  # the attention branch's additive contribution, after its post-norm
    "ffn_in": "pre_feedforward_layernorm",
    "ffn": "post_feedforward_layernorm",  # the FFN branch's additive contribution, after its post-norm
}
SANDWICH_MARKERS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
LAYOUT_MEANINGS = {
    "pre-norm": "attn = self_attn output, ffn = mlp output; attn_in / ffn_in = input_layernorm / "
                "post_attention_layernorm outputs",
    "sandwich": "attn = post_attention_layernorm(self_attn(.)), ffn = post_feedforward_layernorm(mlp(.)): the "
                "branches' additive contributions; attn_in / ffn_in = input_layernorm / pre_feedforward_layernorm "
                "outputs",
}


def get_path(root, dotted: str):
    """`root.a.b` for "a.b", or None where a part is missing; the one lookup of model parts, for modules and
    nnsight envoys alike (tracer backends, remote traces, the trainer)."""
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _find(model: torch.nn.Module, paths: tuple[str, ...], kind: type, what: str) -> str:
    """The first of `paths` that holds a `kind` in `model`, or a UserError naming what was tried."""
    found = next((p for p in paths if isinstance(get_path(model, p), kind)), None)
    if found is None:
        raise UserError(f"unsupported architecture {type(model).__name__}: no {what} found (tried {', '.join(paths)})")
    return found


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers (1-indexed in the paper: layer l is element l - 1)."""
    return get_path(model, _find(model, LAYER_LISTS, torch.nn.ModuleList, "decoder layer list"))


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm applied after the last decoder layer."""
    return get_path(model, _find(model, FINAL_NORMS, torch.nn.Module, "final norm"))


def module_path(model: torch.nn.Module, module: torch.nn.Module) -> str | None:
    """The dotted name of `module` inside `model` (None if it is not one of its modules)."""
    return next((name for name, m in model.named_modules() if m is module), None)


@dataclass
class Layout:
    """Where the sites live in one model: module paths relative to the model root."""

    layers_path: str  # e.g. "model.layers"
    site_names: dict[str, str]  # site -> attribute name inside a decoder layer
    final_norm_path: str
    n_layers: int
    head_path: str = "lm_head"  # the output embedding (unembedding W_U)
    kind: str = "pre-norm"  # "pre-norm" (Llama, Qwen, GPT-2 ...) or "sandwich" (Gemma 2 / 3): LAYOUT_MEANINGS

    def describe(self) -> dict:
        """The manifest's record of what each site is in this model."""
        return {"kind": self.kind, "sites": dict(self.site_names), "meaning": LAYOUT_MEANINGS[self.kind]}

    def layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return get_path(model, self.layers_path)

    def final_norm(self, model: torch.nn.Module) -> torch.nn.Module:
        return get_path(model, self.final_norm_path)


def find_layout(model: torch.nn.Module) -> Layout:
    """Find decoder layers, their four sub-modules and the final norm, or say exactly what is missing."""
    arch = type(model).__name__
    layers_path = _find(model, LAYER_LISTS, torch.nn.ModuleList, "decoder layer list")
    first = get_path(model, layers_path)[0]
    markers = [n for n in SANDWICH_MARKERS if isinstance(getattr(first, n, None), torch.nn.Module)]
    kind, candidates_of = "pre-norm", SITE_MODULES
    if markers:
        missing = [m for m in SANDWICH_MODULES.values() if not isinstance(getattr(first, m, None), torch.nn.Module)]
        if missing:
            raise UserError(f"unsupported architecture {arch}: its layers have {', '.join(markers)} but no "
                            f"{', '.join(missing)}, so A^l and F^l are not the branches' additive contributions")
        kind, candidates_of = "sandwich", {site: (m,) for site, m in SANDWICH_MODULES.items()}
    names = {}
    for site, candidates in candidates_of.items():
        name = next((c for c in candidates if isinstance(getattr(first, c, None), torch.nn.Module)), None)
        if name is None:
            raise UserError(
                f"unsupported architecture {arch}: no {site} module in {layers_path}[0] "
                f"(tried {', '.join(candidates)}; found {', '.join(n for n, _ in first.named_children())})"
            )
        names[site] = name
    final = _find(model, FINAL_NORMS, torch.nn.Module, "final norm")
    head = module_path(model, read_head(model)[0]) or "lm_head"
    return Layout(layers_path, names, final, len(get_path(model, layers_path)), head, kind)


@dataclass
class Activations:
    """Everything one traced forward captures, all (B, T, d) on the model's device."""

    h0: torch.Tensor  # (B, T, d) input of layer 1
    sites: dict[str, list[torch.Tensor]]  # site -> L tensors (B, T, d)
    final_normed: torch.Tensor  # (B, T, d) final_norm(H^L): the model's own head input


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
