"""Command line: `entropylens trace | runs | show | compare | app | bupo | bench` (DESIGN §5).

Every user mistake is an `UserError`, printed as one line with exit code 2 — never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from entropylens.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__.splitlines()[0])
out = Console()
err = Console(stderr=True)


def _parse_limit(limit: str) -> int | None:
    if limit == "all":
        return None
    try:
        value = int(limit)
    except ValueError:
        raise UserError(f"--limit takes a positive integer or 'all', got {limit!r}") from None
    if value <= 0:
        raise UserError(f"--limit must be a positive integer (or 'all'), got {value}")
    return value


@app.command()
def trace(
    model: str = typer.Option("smollm2", help="`smollm2` (embedded), a local folder, a .gguf file or a hub id"),
    prompts: str = typer.Option("arith", help="built-in set (arith, word, mixed) or a .jsonl/.parquet/.csv/.txt file"),
    limit: str = typer.Option("16", help="first N prompts, or 'all'"),
    generate: bool = typer.Option(True, "--generate/--no-generate", help="sample a response per prompt first"),
    max_new_tokens: int = typer.Option(48, help="response length cap"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(1.0, help="nucleus sampling"),
    lens: str = typer.Option("bupo", help="bupo (unembedding only, the paper's) | logit (final norm first) | both"),
    sites: str = typer.Option("attn_in,attn,ffn_in,ffn,layer", help="comma-separated sites to decode"),
    positions: str = typer.Option("all", help="all | response (only positions that predict response tokens)"),
    backend: str = typer.Option("nnsight", help="nnsight | transformer-lens"),
    device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16 | float64"),
    batch_size: int = typer.Option(4, help="prompts per traced forward"),
    name: str = typer.Option(None, help="run folder name (default: timestamp + model + prompts)"),
    seed: int = typer.Option(0, help="seed for built-in prompt sets and sampling"),
    split: str = typer.Option("all", help="all | train | test (built-in sets)"),
    cache: str = typer.Option("cache", help="folder holding runs/ and models/"),
    enable_thinking: bool = typer.Option(False, help="Qwen3 chat templates: thinking mode"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the checkpoint (only when asked)"),
    resume: str = typer.Option(None, help="finish the interrupted run RUN with its stored settings"),
    quiet: bool = typer.Option(False, help="no progress output"),
) -> None:
    """Trace internal-policy entropies of a model over a prompt set into cache/runs/<run>/."""
    from entropylens.trace import TraceConfig, config_from_run, run_trace

    if resume:
        cfg = config_from_run(cache, resume)
    else:
        cfg = TraceConfig(
            model=model, prompts=prompts, limit=_parse_limit(limit), generate=generate,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, lens=lens,
            sites=tuple(s.strip() for s in sites.split(",") if s.strip()), positions=positions,
            backend=backend, device=device, dtype=dtype, batch_size=batch_size, name=name, seed=seed,
            split=split, cache=cache, enable_thinking=enable_thinking, trust_remote_code=trust_remote_code,
        )
    run_dir = run_trace(cfg, resume=bool(resume), progress=not quiet)
    _print_run(run_dir)


def _print_run(run_dir: Path) -> None:
    from entropylens.store import layer_table, read_manifest

    m = read_manifest(run_dir)
    t = m.get("timings", {})
    out.print(f"[bold green]complete[/] {run_dir}  ·  {m['n_tokens']} tokens ({m['n_response_tokens']} response)"
              f"  ·  {t.get('total_s', 0):.1f} s (load {t.get('load_s', 0):.1f}, generate {t.get('generate_s', 0):.1f},"
              f" trace {t.get('trace_s', 0):.1f}, decode {t.get('decode_s', 0):.1f})")
    role = "response" if m.get("n_response_tokens") else "prompt"
    for lens in m["lens"]:
        _print_layer_table(layer_table(run_dir, lens=lens, role=role), f"{m['run_id']} · lens {lens} · {role} tokens")


def _print_layer_table(df, title: str) -> None:
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        table.add_column(col, justify="right")
    for row in df.itertuples(index=False):
        table.add_row(*[str(v) if isinstance(v, (int,)) else f"{v:.3f}" for v in row])
    out.print(table)


@app.command()
def runs(cache: str = typer.Option("cache", help="folder holding runs/")) -> None:
    """List runs: model, prompts, tokens, lens, status, date."""
    from entropylens.store import list_runs

    df = list_runs(Path(cache))
    if df.empty:
        out.print(f"no runs in {Path(cache) / 'runs'}")
        return
    table = Table()
    cols = ["run_id", "kind", "model", "prompts", "n_tokens", "lens", "status", "created"]
    for c in cols:
        table.add_column(c)
    for row in df[cols].itertuples(index=False):
        table.add_row(*["" if v is None or v != v else str(v) for v in row])
    out.print(table)


@app.command()
def show(
    run: str = typer.Argument(..., help="run id (folder name under cache/runs)"),
    lens: str = typer.Option(None, help="bupo | logit (default: every lens stored)"),
    role: str = typer.Option("response", help="response | prompt | all"),
    cache: str = typer.Option("cache"),
) -> None:
    """Per-layer mean entropy of the layer / attention / FFN policies and ΔH."""
    from entropylens.store import layer_table, read_manifest, resolve_run

    run_dir = resolve_run(cache, run)
    m = read_manifest(run_dir)
    for ln in [lens] if lens else m.get("lens", ["bupo"]):
        _print_layer_table(layer_table(run_dir, lens=ln, role=role), f"{run} · lens {ln} · {role} tokens")


@app.command()
def compare(
    run_a: str = typer.Argument(..., help="first (e.g. parent / base) run"),
    run_b: str = typer.Argument(..., help="second (e.g. child / trained) run"),
    lens: str = typer.Option("bupo"),
    role: str = typer.Option("response"),
    cache: str = typer.Option("cache"),
) -> None:
    """Per-layer difference B − A of mean entropies and ΔH."""
    from entropylens.store import layer_table, resolve_run

    a = layer_table(resolve_run(cache, run_a), lens=lens, role=role).set_index("layer")
    b = layer_table(resolve_run(cache, run_b), lens=lens, role=role).set_index("layer")
    if len(a) != len(b):
        raise UserError(f"runs have different depths ({len(a) - 1} vs {len(b) - 1} layers); compare needs one model")
    _print_layer_table((b - a).reset_index(), f"{run_b} − {run_a} · lens {lens} · {role} tokens")


@app.command("app")
def app_cmd(
    cache: str = typer.Option("cache", help="folder holding runs/"),
    host: str = typer.Option("127.0.0.1", help="interface to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8050),
    debug: bool = typer.Option(False),
) -> None:
    """Start the dashboard (reads run folders only)."""
    from app.server import serve

    serve(Path(cache), host=host, port=port, debug=debug)


@app.command()
def bench(
    model: str = typer.Option("smollm2", help="model spec (ignored with --vocab/--d-model)"),
    batch: int = typer.Option(4, help="sequences"),
    seq: int = typer.Option(128, help="tokens per sequence"),
    sites: str = typer.Option("attn_in,attn,ffn_in,ffn,layer", help="comma-separated sites"),
    methods: str = typer.Option("transformer-lens,nnsight,entropylens,floor", help="methods to run, in order"),
    vocab: int = typer.Option(None, help="random-head mode: vocabulary size (e.g. 151936)"),
    d_model: int = typer.Option(None, help="random-head mode: width (e.g. 1024)"),
    tokens: int = typer.Option(4096, help="random-head mode: token rows"),
    threads: int = typer.Option(None, help="torch threads"),
    cache: str = typer.Option("cache"),
) -> None:
    """Decode engine vs the TransformerLens and nnsight recipes vs the fp32 GEMM floor, in one process."""
    from entropylens.bench import BenchConfig, run_bench

    for name, value in (("batch", batch), ("seq", seq), ("tokens", tokens)):
        if value <= 0:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    cfg = BenchConfig(model=model, batch=batch, seq=seq, sites=tuple(sites.split(",")),
                      methods=tuple(methods.split(",")), vocab=vocab, d_model=d_model, tokens=tokens,
                      threads=threads, cache=Path(cache))
    df = run_bench(cfg)
    table = Table(title="entropylens bench", title_justify="left")
    for col in df.columns:
        table.add_column(str(col), justify="right")
    for row in df.itertuples(index=False):
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    out.print(table)


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: partial results kept; continue with `entropylens trace --resume RUN`")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
