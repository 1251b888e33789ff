"""Command line: `entropylens trace | runs | show | compare | report | app | bupo | bench` (README: Command line).

Every user mistake is an `UserError`, printed as one line with exit code 2 — never a traceback. Progress and
results are rich output; diagnostics are `logging` records, shown from WARNING up unless `-v` asks for more.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from entropylens.analysis.config import ReportConfig
from entropylens.app.config import AppConfig
from entropylens.bupo.config import BupoRunConfig
from entropylens.cli.logs import configure_logging
from entropylens.cli.output import out, print_bench, print_bupo, print_layer_table, print_outcome_table, print_run
from entropylens.errors import UserError
from entropylens.options import build, cli_options
from entropylens.store.cache import RUNS_HELP, Cache
from entropylens.tracing.config import BenchConfig, TraceConfig

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__.splitlines()[0])
err = Console(stderr=True)


@app.callback()
def _global(verbose: int = typer.Option(0, "--verbose", "-v", count=True,
                                        help="diagnostics on stderr: -v info (kernel, backend, batches, resume "
                                             "decisions), -vv debug")) -> None:
    configure_logging(verbose)


def _reading(cache: str, runs_dir: str | None) -> Cache:
    """The folders a read command looks in; a `--runs` folder that does not exist is a mistake, not 'no runs'."""
    folders = Cache(cache, runs=runs_dir)
    if runs_dir is not None and not folders.runs.is_dir():
        raise UserError(f"--runs {runs_dir}: no such folder")
    return folders


def _where(cfg: TraceConfig | BupoRunConfig) -> str:
    """`--cache C [--runs R]`, for the resume hint of an interrupted run."""
    return f"--cache {cfg.cache}" + (f" --runs {cfg.runs_dir}" if cfg.runs_dir else "")


@app.command()
@cli_options(TraceConfig)
def trace(
    options: dict,
    resume: str = typer.Option(None, help="finish the interrupted run RUN with its stored settings"),
    quiet: bool = typer.Option(False, help="no progress output"),
) -> None:
    """Trace internal-policy entropies of a model over a prompt set into cache/runs/<run>/ (or --runs)."""
    from entropylens.tracing.shard import close, shard_from_env
    from entropylens.tracing.job import TraceInterrupted, config_from_run, run_trace

    shard = shard_from_env()  # under `torchrun --nproc-per-node N -m entropylens trace ...`
    cfg = config_from_run(options["cache"], resume, options["runs_dir"]) if resume else build(TraceConfig, options)
    try:
        run_dir = run_trace(cfg, resume=bool(resume), progress=not quiet, shard=shard)
    except KeyboardInterrupt as e:  # click would turn it into a silent Abort
        kept = (f"run {e.run_id} kept; finish it with `entropylens trace --resume {e.run_id} {_where(cfg)}`"
                if isinstance(e, TraceInterrupted) else "no run was started")
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    finally:
        close(shard)
    if shard is None or shard.is_main:
        print_run(run_dir)


@app.command()
def runs(cache: str = typer.Option("cache", help="folder holding runs/ (unless --runs)"),
         runs_dir: str = typer.Option(None, "--runs", help=RUNS_HELP)) -> None:
    """List runs: model, prompts, tokens, lens, status, date."""
    from entropylens.store import list_runs

    folders = _reading(cache, runs_dir)
    df = list_runs(folders)
    if df.empty:
        out.print(f"no runs in {folders.runs}")
        return
    table = Table()
    cols = ["run_id", "kind", "model", "prompts", "n_tokens", "lens", "status", "created"]
    for c in cols:
        table.add_column(c, no_wrap=c == "run_id", min_width=max(map(len, df.run_id)) if c == "run_id" else None)
    for row in df[cols].itertuples(index=False):
        table.add_row(*["" if v is None or v != v else str(v) for v in row])
    out.print(table)


@app.command()
def show(
    run: str = typer.Argument(..., help="run id (folder name under cache/runs, or --runs)"),
    lens: str = typer.Option(None, help="bupo | logit (default: every lens stored)"),
    role: str = typer.Option("response", help="response | prompt | all"),
    by: str = typer.Option(None, help="outcome: correct vs wrong responses, their difference and a 95 % interval "
                           "(bootstrap over responses; response tokens)"),
    topk: bool = typer.Option(False, "--topk", help="with --position: each layer's top-K tokens per site"),
    position: int = typer.Option(None, help="position for --topk"),
    prompt: int = typer.Option(0, help="prompt_idx for --topk"),
    cache: str = typer.Option("cache", help="folder holding runs/ (unless --runs)"),
    runs_dir: str = typer.Option(None, "--runs", help=RUNS_HELP),
) -> None:
    """Per-layer mean entropy of the layer / attention / FFN policies and ΔH (or, with --topk, top-K tokens)."""
    from entropylens.cli.output import print_topk_position
    from entropylens.store import layer_table, read_manifest, resolve_run

    run_dir = resolve_run(_reading(cache, runs_dir), run)
    m = read_manifest(run_dir)
    if by not in (None, "outcome"):
        raise UserError(f"unknown --by {by!r}; the only split is 'outcome'")
    if topk != (position is not None):
        raise UserError("--topk and --position go together: `show RUN --topk --position N`")
    for ln in [lens] if lens else m.get("lens", ["bupo"]):
        if topk:
            print_topk_position(run_dir, ln, prompt, position)
        elif by == "outcome":
            print_outcome_table(run_dir, ln)
        else:
            print_layer_table(layer_table(run_dir, lens=ln, role=role), f"{run} · lens {ln} · {role} tokens")


@app.command()
def compare(
    run_a: str = typer.Argument(..., help="first (e.g. parent / base) run"),
    run_b: str = typer.Argument(..., help="second (e.g. child / trained) run"),
    lens: str = typer.Option("bupo"),
    role: str = typer.Option("response"),
    cache: str = typer.Option("cache", help="folder holding runs/ (unless --runs)"),
    runs_dir: str = typer.Option(None, "--runs", help=RUNS_HELP),
) -> None:
    """Per-layer difference B − A of mean entropies and ΔH."""
    from entropylens.analysis.stages import layer_difference
    from entropylens.store import layer_table, resolve_run

    folders = _reading(cache, runs_dir)
    a = layer_table(resolve_run(folders, run_a), lens=lens, role=role)
    b = layer_table(resolve_run(folders, run_b), lens=lens, role=role)
    print_layer_table(layer_difference(a, b), f"{run_b} − {run_a} · lens {lens} · {role} tokens")


@app.command("app")
@cli_options(AppConfig)
def app_cmd(options: dict) -> None:
    """Serve the dashboard (reads run folders only): gunicorn workers, or --dev for Dash's development server."""
    from entropylens.app.server import serve

    serve(build(AppConfig, options))


@app.command()
@cli_options(BenchConfig)
def bench(options: dict) -> None:
    """Decode engine vs the TransformerLens and nnsight recipes vs the fp32 GEMM floor, in one process."""
    from entropylens.tracing.bench import run_bench

    cfg = build(BenchConfig, options)
    df = run_bench(cfg)
    print_bench(df)


@app.command()
@cli_options(BupoRunConfig)
def bupo(
    options: dict,
    resume: str = typer.Option(None, help="continue the interrupted run RUN with its stored settings"),
    quiet: bool = typer.Option(False, help="no progress output"),
) -> None:
    """BuPO (or GRPO): choose k, train, save, evaluate and re-trace base vs trained into cache/runs/ (or --runs).

    Data-parallel with `torchrun --nproc-per-node N -m entropylens bupo ...` or `accelerate launch`.
    """
    from entropylens.bupo.checkpoint import Interrupted
    from entropylens.bupo.distributed import rank
    from entropylens.bupo.pipeline import config_from_run, run_bupo

    cfg = config_from_run(options["cache"], resume, options["runs_dir"]) if resume else build(BupoRunConfig, options)
    try:
        r = run_bupo(cfg, progress=not quiet, resume=bool(resume))
    except Interrupted as e:
        print(f"interrupted after step {e.step}: training state saved; continue with "
              f"`entropylens bupo --resume {e.run_id} {_where(cfg)}`", file=sys.stderr)
        sys.exit(130)
    if rank() > 0:  # under torchrun / accelerate launch rank 0 speaks for the job
        return
    print_bupo(r)


@app.command()
@cli_options(ReportConfig)
def report(
    options: dict,
    runs: list[str] = typer.Argument(..., help="run ids under CACHE/runs or --runs (one or more)"),
) -> None:
    """Paper-style figures, stage table and a self-contained HTML + Markdown report from cached runs."""
    import shlex

    from entropylens.analysis.report import build_report

    o = options
    _reading(o["cache"], o["runs_dir"])
    command = shlex.join(["entropylens", "report", *runs, "-o", o["out"], "--cache", o["cache"]]
                         + (["--runs", o["runs_dir"]] if o["runs_dir"] else [])
                         + ["--role", o["role"], "--band", f"{o['band']:g}", "--collapse-frac",
                            f"{o['collapse_frac']:g}", "--images", ",".join(o["images"]) or "none",
                            "--title", o["title"]]
                         + (["--notes", o["notes"]] if o["notes"] else []))
    index = build_report(build(ReportConfig, o | {"runs": list(runs), "command": command}))
    out = Path(o["out"])
    Console().print(f"[bold green]report[/] {index}  ·  {out / 'README.md'}  ·  {out / 'figures'}")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # typer returns 130 for a Ctrl-C it caught itself
        if isinstance(code, int) and code:
            sys.exit(code)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)  # one line, never wrapped
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: partial results kept; continue with `entropylens trace --resume RUN`")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # usage errors carry their own exit code; typer vendors click, so check both
        import click

        if isinstance(e, (click.exceptions.ClickException, typer.TyperException)) and hasattr(e, "format_message"):
            print(f"error: {e.format_message()}", file=sys.stderr)  # one line, like a UserError
            sys.exit(e.exit_code)
        if isinstance(e, (click.exceptions.Abort, typer.Abort)):
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
