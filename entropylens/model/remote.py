"""Remote tracing through NDIF (nnsight's remote backend) for models no local machine holds.

The model runs on NDIF's servers; the trace body below unembeds every site there, in fp64, and reduces
each distribution to per-token statistics (entropy, top-1 id, top-1 probability; for the output policy
also log p(next token)). Only those (B, T) tensors come back, never (B, T, V) logits. Locally the model
is a meta-device skeleton (config and tokenizer only).

`mode="local"` runs the very same request through nnsight's LocalSimulationBackend: the block is
serialised exactly as for NDIF, deserialised with local modules (entropylens included) hidden, and
executed against a local model. The tests use it to check the remote reductions against the local
decode engine; a real NDIF round trip cannot be made from a machine without that network.

Set-up: an API key from https://login.ndif.us, then `export NDIF_API_KEY=...` (or once:
`python -c "from nnsight import CONFIG; CONFIG.set_default_api_key('KEY')"`).
"""

from __future__ import annotations

import warnings

import torch

from entropylens.core.decode import Stats
from entropylens.errors import UserError
from entropylens.model.load import LoadedModel, describe_model
from entropylens.core.lens import lens_spec, softcap_of
from entropylens.model.layout import Layout, find_layout, get_path

MODES = ("ndif", "local")  # a real NDIF request | the same request simulated here


class RemoteModel:
    """An nnsight LanguageModel whose traces run remotely (`ndif`) or as a local simulation (`local`)."""

    def __init__(self, lm, layout: Layout, mode: str):
        if mode not in MODES:
            raise ValueError(f"remote mode must be one of {MODES}")
        self.lm, self.layout, self.mode = lm, layout, mode
        self.remote = True if mode == "ndif" else "local"

    @classmethod
    def wrap(cls, model: torch.nn.Module, tokenizer, mode: str = "local") -> RemoteModel:
        """A local model behind the remote code path (tests, and checking a request before sending it)."""
        from nnsight import LanguageModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = LanguageModel(model, tokenizer=tokenizer)
        return cls(lm, find_layout(model), mode)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, mask: torch.Tensor, seed: int, **sampling) -> torch.Tensor:
        """Sampled continuations (B, T + new), seeded on the serving side."""
        lm = self.lm
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with lm.generate(ids, attention_mask=mask, remote=self.remote, **sampling):
                torch.manual_seed(seed)
                out = lm.generator.output.save()
        return out

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, targets: torch.Tensor, lenses: list[str],
               sites: tuple[str, ...]) -> tuple[Stats, dict[str, dict[str, Stats]]]:
        """One remote forward over ids (B, T) -> (output-policy Stats (B, T) with log p(targets),
        {lens: {site: Stats (L, B, T), `layer`: (L + 1, B, T) with H^0 first}})."""
        import nnsight

        lm, lay = self.lm, self.layout
        layers, norm, head = (get_path(lm, p) for p in (lay.layers_path, lay.final_norm_path, lay.head_path))
        names = lay.site_names  # site -> submodule attribute of a decoder layer
        order = [s for s in ("attn_in", "attn", "ffn_in", "ffn") if s in sites]  # execution order
        cap = softcap_of(lm.config)  # the lens reads W_U, bias and soft-cap as lens.read_head does
        use_norm = [_remote_form(name) == "norm-unembed" for name in lenses]  # the registry says how
        want_layer = "layer" in sites
        # Everything inside this block runs on the serving side: it may use only torch, nnsight and the names
        # bound above. Only values saved *in* the block travel back (a container from outside would not).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with lm.trace(ids, remote=self.remote):
                res = nnsight.save({})  # name -> list of (3, B, T) per layer; "final" -> (4, B, T)
                W = head.weight.double()  # (V, d)
                b = None if head.bias is None else head.bias.double()
                rows = []
                if want_layer:
                    rows.append(("layer", layers[0].input))  # H^0
                for layer in layers:
                    for site in order:
                        x = getattr(layer, names[site]).output
                        rows.append((site, x[0] if isinstance(x, tuple) else x))
                    if want_layer:
                        x = layer.output
                        rows.append(("layer", x[0] if isinstance(x, tuple) else x))
                    for site, x in rows:
                        for k, normed in enumerate(use_norm):
                            z = torch.nn.functional.linear((norm(x) if normed else x).double(), W, b)  # (B, T, V)
                            if cap:
                                z = cap * torch.tanh(z / cap)
                            logp = torch.log_softmax(z, -1)
                            top = logp.max(-1)
                            res.setdefault(f"{k}/{site}", []).append(
                                torch.stack([-(logp.exp() * logp).sum(-1), top.values.exp(), top.indices.double()]))
                    rows = []
                z = head.output.double()  # (B, T, V) the model's own output logits
                logp = torch.log_softmax(z, -1)
                top = logp.max(-1)
                lt = logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
                res["final"] = torch.stack([-(logp.exp() * logp).sum(-1), top.values.exp(), top.indices.double(), lt])

        def stats(t: torch.Tensor) -> Stats:  # (..., 3 or 4, B, T) stacked -> Stats
            return Stats(t[0], t[2].long(), t[1], t[3] if len(t) > 3 else None)

        out = {name: {site: stats(torch.stack(res[f"{k}/{site}"], 1))  # (3, L, B, T)
                      for site in sites} for k, name in enumerate(lenses)}
        return stats(res["final"]), out


def _remote_form(lens: str) -> str:
    """How the serving side computes registered lens `lens` (LensSpec.remote); lenses it cannot run are refused."""
    form = lens_spec(lens).remote
    if form is None:
        raise UserError(f"lens {lens!r} runs locally only (its spec declares no remote form); drop --remote")
    return form


def connect(model_id: str, mode: str = "ndif") -> tuple[LoadedModel, RemoteModel]:
    """A meta-device skeleton of a hub model NDIF serves (config + tokenizer only) and its RemoteModel."""
    from nnsight import CONFIG, LanguageModel

    if mode == "ndif" and not CONFIG.API.APIKEY:
        raise UserError("--remote needs an NDIF API key: get one at https://login.ndif.us, then "
                        "export NDIF_API_KEY=<key>")
    if model_id.strip().lower().startswith("smollm2") or model_id.startswith((".", "/", "~")):
        raise UserError(f"--remote traces a hub model that NDIF serves (e.g. meta-llama/Llama-3.1-8B); "
                        f"{model_id!r} is local: trace it without --remote")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lm = LanguageModel(model_id)  # meta weights: nothing is downloaded but config and tokenizer
    except OSError:
        raise UserError(f"could not fetch the config and tokenizer of {model_id!r} from the hub") from None
    model, tok, cfg = lm._model, lm.tokenizer, lm.config
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    info = describe_model(model, model_id, "ndif", getattr(cfg, "_commit_hash", None) or "unknown",
                          str(getattr(cfg, "torch_dtype", "remote")))
    return LoadedModel(model, tok, info), RemoteModel(lm, find_layout(model), mode)
