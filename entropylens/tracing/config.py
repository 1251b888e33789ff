"""The configs of `entropylens trace` and `entropylens bench`, declared once: each dataclass is its command's
options. TraceConfig is stored in the manifest so `--resume` can rebuild the run.

Light on purpose (no torch): the command line builds its help from these; the checks that need the backends
or the decode kernels import them when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from entropylens.data.rewards import REWARDS, RULES_HELP
from entropylens.errors import UserError
from entropylens.model.spec import ModelSpec
from entropylens.options import option, parse_csv, parse_limit
from entropylens.store.vocab import SITES

POSITIONS = ("all", "response")
LONG_PROMPTS = ("reject", "truncate")
MAX_TOPK = 100  # a top-K list per row is kept sorted by insertion: cheap for small K only


@dataclass
class TraceConfig(ModelSpec):
    """Everything that defines a trace run; stored in the manifest so `--resume` can rebuild it."""

    prompts: str = option("arith", "built-in set (arith, word, mixed, digits) or a .jsonl/.parquet/.csv/.txt file")
    limit: int | None = option(8, "first N prompts, or 'all'", parse=parse_limit)
    generate: bool = option(True, "sample a response per prompt first")
    max_new_tokens: int = option(32, "response length cap")
    temperature: float = option(1.0, "sampling temperature (0 = greedy)")
    top_p: float = option(1.0, "nucleus sampling")
    lens: str = option("bupo", "bupo (unembedding only, the paper's) | logit (final norm first) | both | any "
                       "registered lens")
    sites: tuple[str, ...] = option(SITES, "comma-separated sites to decode", parse=parse_csv,
                                    shown=",".join(SITES))
    positions: str = option("all", "all | response (only positions that predict response tokens)")
    backend: str = option("nnsight", "nnsight | transformer-lens")
    device_map: str | None = option(None, "spread the model over devices with accelerate: auto | balanced | "
                                    "sequential | a .json file {module: cpu|cuda:N|disk} (replaces --device)")
    remote: bool = option(False, "run a hub model on NDIF through nnsight (needs NDIF_API_KEY); entropies are "
                          "reduced remotely, only per-token statistics come back")
    batch_size: int = option(4, "prompts per traced forward")
    name: str | None = option(None, "run folder name (default: timestamp + model + prompts)")
    seed: int = option(0, "seed for built-in prompt sets and sampling")
    enable_thinking: bool = option(False, "Qwen3 chat templates: thinking mode")
    compile: bool = option(False, "the torch.compile decode kernel (= --kernel compiled; ~15 s to compile once)")
    kernel: str = option("auto", "decode kernel: auto (native C kernel on CPU when a C compiler is present, else "
                         "eager) | native | compiled | eager")
    topk: int = option(5, "store the K most probable tokens of every (lens, site, layer, position) in topk.parquet "
                       "(0 = none; top-1 is always in entropy.parquet)")
    parent_run: str | None = option(None, "link to a parent run (BuPO before/after)", cli=False)
    split: str = option("all", "all | train | test (built-in sets)")
    long_prompts: str = option("reject", "prompts beyond the model's context: reject | truncate (keeps the last "
                               "tokens that fit; the manifest records how many were dropped)")
    samples: int = option(1, "responses per prompt, each its own sequence (seeded per prompt, independent of "
                          "--batch-size)")
    reward: str = option("exact", "rule scoring each response against the prompt's reference: " + RULES_HELP)
    bad_references: str = option("error", "a reference present but empty or malformed: error (one line naming "
                                 "the row) | null (score that row null)")
    extra: dict = option({}, "free-form provenance recorded in the manifest", cli=False)

    def lenses(self) -> list[str]:
        from entropylens.core.lens import lens_names

        return lens_names(self.lens)

    def validate(self) -> None:
        """Mistakes that need no model: one UserError line each."""
        from entropylens.core.decode import KERNELS
        from entropylens.core.lens import LENSES
        from entropylens.model.backends import BACKENDS

        if self.lens != "both" and self.lens not in LENSES:
            raise UserError(f"unknown --lens {self.lens!r}; choose {', '.join(LENSES)} or both")
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise UserError(f"unknown site {bad[0] if bad else '(none)'}; choose from {', '.join(SITES)}")
        if self.backend not in BACKENDS:
            raise UserError(f"unknown --backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.positions not in POSITIONS:
            raise UserError(f"unknown --positions {self.positions!r}; choose all or response")
        if self.long_prompts not in LONG_PROMPTS:
            raise UserError(f"unknown --long-prompts {self.long_prompts!r}; choose reject or truncate")
        if self.max_new_tokens < 0:
            raise UserError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.reward not in REWARDS:
            raise UserError(f"unknown --reward {self.reward!r}; choose one of {', '.join(REWARDS)}")
        if self.bad_references not in ("error", "null"):
            raise UserError(f"unknown --bad-references {self.bad_references!r}; choose error or null")
        for name in ("batch_size", "limit", "samples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not 0 <= self.topk <= MAX_TOPK:
            raise UserError(f"--topk must be between 0 and {MAX_TOPK}, got {self.topk}")
        if self.kernel not in KERNELS:
            raise UserError(f"unknown --kernel {self.kernel!r}; choose from {', '.join(KERNELS)}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.remote and (self.backend != "nnsight" or self.device_map):
            raise UserError("--remote runs through nnsight on NDIF's machines: drop --backend/--device-map")
        if self.positions == "response" and not self.generate:
            raise UserError("--positions response needs --generate (there is no response to decode)")
        if self.samples > 1 and (not self.generate or self.temperature == 0):
            raise UserError("--samples > 1 needs sampling: --generate with --temperature > 0")


METHODS = ("transformer-lens", "nnsight", "entropylens", "entropylens-eager", "entropylens-compiled", "floor")
TOP1 = "entropylens-top1"  # the default path keeping top-1 only: run beside `entropylens` when --topk K > 1


@dataclass
class BenchConfig:
    """What `entropylens bench` measures; its fields are the command's options."""

    model: str = option("smollm2", "model spec (ignored with --vocab/--d-model)")
    batch: int = option(4, "sequences")
    seq: int = option(128, "tokens per sequence")
    sites: tuple[str, ...] = option(SITES, "comma-separated sites", parse=parse_csv, shown=",".join(SITES))
    methods: tuple[str, ...] = option(METHODS, "methods to run, in order (entropylens = the default path, kernel "
                                      "auto)", parse=parse_csv, shown=",".join(METHODS))
    vocab: int | None = option(None, "random-head mode: vocabulary size (e.g. 151936)")
    d_model: int | None = option(None, "random-head mode: width (e.g. 1024)")
    tokens: int = option(4096, "random-head mode: token rows")
    ref_rows: int = option(64, "rows per site sampled for the fp64 reference", cli=False)
    threads: int | None = option(None, "torch threads")
    topk: int = option(1, "top-K list per row the entropylens methods keep (as `trace --topk`); K > 1 also runs "
                       f"{TOP1} (K = 1) beside the default path and reports the rate ratio")
    repeats: int = option(1, "round-robin rounds of every method: fastest run per method, ratios paired per round "
                              "with a 95 % interval (n >= 2)")
    seed: int = option(0, "seeds the token batch, the random head and the reference rows", cli=False)
    cache: Path = option(Path("cache"), "folder holding models/", parse=Path, shown="cache")

    def validate(self) -> None:
        """Mistakes that need no model: one UserError line each."""
        for name in ("batch", "seq", "tokens", "repeats"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if not 1 <= self.topk <= 100:
            raise UserError(f"--topk must be between 1 and 100, got {self.topk}")
        if (self.vocab is None) != (self.d_model is None):
            raise UserError("random-head mode needs both --vocab and --d-model")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
        bad_sites = [s for s in self.sites if s not in SITES]
        if bad_sites or not self.sites:
            raise UserError(f"unknown site {bad_sites[0] if bad_sites else ''!r}; choose from {', '.join(SITES)}")
