"""Tracing backends: one forward pass that returns every site's activation (sites.Activations).

`nnsight` (default) reads module outputs inside an nnsight trace; `transformer-lens` reads the
equivalent hook points of a TransformerLens 4 `TransformerBridge`. Both wrap the same HF model object,
so they agree to fp32 rounding. The bridge rewires its copy to HF's eager attention, the plain model runs
SDPA: the two kernels sum in different orders (~1e-5 nats apart on the tiny test model), each within the fp64
budget; with eager attention on both sides the entropies are identical.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch

from entropylens.errors import UserError
from entropylens.model.layout import SITES, Activations, Layout, first_tensor, get_path

BACKENDS = ("nnsight", "transformer-lens")


class Backend(Protocol):
    name: str

    def capture(self, input_ids: torch.Tensor) -> Activations:  # (B, T) right-padded ids
        ...


class NnsightBackend:
    """Saves module outputs in execution order (nnsight 0.8 raises OutOfOrderError otherwise)."""

    name = "nnsight"

    def __init__(self, model: torch.nn.Module, tokenizer, layout: Layout):
        from nnsight import LanguageModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LanguageModel's deprecation notice
            self.lm = LanguageModel(model, tokenizer=tokenizer)
        self.layout = layout

    def capture(self, input_ids: torch.Tensor) -> Activations:
        lay = self.layout
        layers, final_norm = get_path(self.lm, lay.layers_path), get_path(self.lm, lay.final_norm_path)
        n = lay.site_names
        saved: dict[str, list] = {s: [] for s in SITES}
        with torch.no_grad(), self.lm.trace(input_ids):
            h0 = layers[0].input.save()
            for layer in layers:
                saved["attn_in"].append(getattr(layer, n["attn_in"]).output.save())
                saved["attn"].append(getattr(layer, n["attn"]).output.save())
                saved["ffn_in"].append(getattr(layer, n["ffn_in"]).output.save())
                saved["ffn"].append(getattr(layer, n["ffn"]).output.save())
                saved["layer"].append(layer.output.save())
            normed = final_norm.output.save()
        sites = {s: [first_tensor(x) for x in xs] for s, xs in saved.items()}
        return Activations(h0=first_tensor(h0), sites=sites, final_normed=first_tensor(normed))


class TransformerLensBackend:
    """TransformerBridge hook points: ln1.hook_out, hook_attn_out, ln2.hook_out, hook_mlp_out, hook_resid_post."""

    name = "transformer-lens"
    HOOKS = {
        "attn_in": "blocks.{l}.ln1.hook_out",
        "attn": "blocks.{l}.hook_attn_out",
        "ffn_in": "blocks.{l}.ln2.hook_out",
        "ffn": "blocks.{l}.hook_mlp_out",
        "layer": "blocks.{l}.hook_resid_post",
    }

    def __init__(self, model: torch.nn.Module, tokenizer, layout: Layout):
        import copy

        if layout.kind != "pre-norm":  # its hook points are not checked to be the post-normed branch outputs
            raise UserError(f"transformer-lens backend does not trace {layout.kind} layouts "
                            f"({type(model).__name__}); use --backend nnsight")
        from transformer_lens.model_bridge import TransformerBridge

        # The bridge rewires the HF model in place (eager attention, its own components), which would change
        # what generation samples; it gets a copy so responses never depend on the backend.
        model = copy.deepcopy(model)
        name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tokenizer)
        except Exception as e:  # TL raises assorted types for architectures it has no adapter for
            raise UserError(
                f"transformer-lens backend cannot wrap {type(model).__name__}: {str(e).splitlines()[0]}; "
                "use --backend nnsight"
            ) from None
        self.n_layers = layout.n_layers
        missing = [h for h in self._hook_names() if h not in self.bridge.hook_dict]
        if missing:
            raise UserError(f"transformer-lens bridge lacks hook {missing[0]}; use --backend nnsight")

    def _hook_names(self) -> list[str]:
        names = ["blocks.0.hook_resid_pre", "ln_final.hook_out"]
        for layer in range(self.n_layers):
            names += [h.format(l=layer) for h in self.HOOKS.values()]
        return names

    def capture(self, input_ids: torch.Tensor) -> Activations:
        store: dict[str, torch.Tensor] = {}

        def keeper(name: str):  # alias hook points report their canonical name: key by the asked name
            def keep(t, hook):
                store[name] = first_tensor(t)

            return keep

        with torch.no_grad():
            self.bridge.run_with_hooks(
                input_ids, return_type=None, fwd_hooks=[(h, keeper(h)) for h in self._hook_names()]
            )
        sites = {s: [store[h.format(l=i)] for i in range(self.n_layers)] for s, h in self.HOOKS.items()}
        return Activations(h0=store["blocks.0.hook_resid_pre"], sites=sites, final_normed=store["ln_final.hook_out"])


def make_backend(name: str, model: torch.nn.Module, tokenizer, layout: Layout) -> Backend:
    if name == "nnsight":
        return NnsightBackend(model, tokenizer, layout)
    if name == "transformer-lens":
        return TransformerLensBackend(model, tokenizer, layout)
    raise UserError(f"unknown --backend {name!r}; choose one of {', '.join(BACKENDS)}")
