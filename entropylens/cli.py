"""Command line: `entropylens trace | runs | show | compare | app | bupo | bench` (DESIGN §5).

Every user mistake is an `UserError`, printed as one line with exit code 2 — never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from entropylens.cli_print import out, print_bupo, print_layer_table, print_outcome_table, print_run
from entropylens.config import TraceConfig
from entropylens.errors import UserError
from entropylens.options import build, cli_options, parse_limit
from entropylens.rewards import RULES_HELP

app = typer.Typer(add_completion=False, no_args_is_help=False, help=__doc__.splitlines()[0])
err = Console(stderr=True)


@app.command()
@cli_options(TraceConfig)
def trace(
    options: dict,
    resume: str = typer.Option(None, help="finish the interrupted run RUN with its stored settings"),
    quiet: bool = typer.Option(False, help="no progress output"),
) -> None:
    """Trace internal-policy entropies of a model over a prompt set into cache/runs/<run>/."""
    from entropylens.dist import close, shard_from_env
    from entropylens.trace import TraceInterrupted, config_from_run, run_trace

    shard = shard_from_env()  # under `torchrun --nproc-per-node N -m entropylens trace ...`
    cfg = config_from_run(options["cache"], resume) if resume else build(TraceConfig, options)
    try:
        run_dir = run_trace(cfg, resume=bool(resume), progress=not quiet, shard=shard)
    except KeyboardInterrupt as e:  # click would turn it into a silent Abort
        kept = (f"run {e.run_id} kept; finish it with `entropylens trace --resume {e.run_id} --cache {cfg.cache}`"
                if isinstance(e, TraceInterrupted) else "no run was started")
        print(f"interrupted: {kept}", file=sys.stderr)
        sys.exit(130)
    finally:
        close(shard)
    if shard is None or shard.is_main:
        print_run(run_dir)


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
        table.add_column(c, no_wrap=c == "run_id", min_width=max(map(len, df.run_id)) if c == "run_id" else None)
    for row in df[cols].itertuples(index=False):
        table.add_row(*["" if v is None or v != v else str(v) for v in row])
    out.print(table)


@app.command()
def show(
    run: str = typer.Argument(..., help="run id (folder name under cache/runs)"),
    lens: str = typer.Option(None, help="bupo | logit (default: every lens stored)"),
    role: str = typer.Option("response", help="response | prompt | all"),
    by: str = typer.Option(None, help="outcome: correct vs wrong responses, their difference and a 95 % interval "
                           "(bootstrap over responses; response tokens)"),
    cache: str = typer.Option("cache"),
) -> None:
    """Per-layer mean entropy of the layer / attention / FFN policies and ΔH."""
    from entropylens.store import layer_table, read_manifest, resolve_run

    run_dir = resolve_run(cache, run)
    m = read_manifest(run_dir)
    if by not in (None, "outcome"):
        raise UserError(f"unknown --by {by!r}; the only split is 'outcome'")
    for ln in [lens] if lens else m.get("lens", ["bupo"]):
        if by == "outcome":
            print_outcome_table(run_dir, ln)
        else:
            print_layer_table(layer_table(run_dir, lens=ln, role=role), f"{run} · lens {ln} · {role} tokens")


@app.command()
def compare(
    run_a: str = typer.Argument(..., help="first (e.g. parent / base) run"),
    run_b: str = typer.Argument(..., help="second (e.g. child / trained) run"),
    lens: str = typer.Option("bupo"),
    role: str = typer.Option("response"),
    cache: str = typer.Option("cache"),
) -> None:
    """Per-layer difference B − A of mean entropies and ΔH."""
    from entropylens.stages import layer_difference
    from entropylens.store import layer_table, resolve_run

    a = layer_table(resolve_run(cache, run_a), lens=lens, role=role)
    b = layer_table(resolve_run(cache, run_b), lens=lens, role=role)
    print_layer_table(layer_difference(a, b), f"{run_b} − {run_a} · lens {lens} · {role} tokens")


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
    methods: str = typer.Option("transformer-lens,nnsight,entropylens,entropylens-eager,entropylens-compiled,floor",
                                help="methods to run, in order (entropylens = the default path, kernel auto)"),
    vocab: int = typer.Option(None, help="random-head mode: vocabulary size (e.g. 151936)"),
    d_model: int = typer.Option(None, help="random-head mode: width (e.g. 1024)"),
    tokens: int = typer.Option(4096, help="random-head mode: token rows"),
    threads: int = typer.Option(None, help="torch threads"),
    repeats: int = typer.Option(1, help="round-robin runs of every method; each reports its fastest"),
    cache: str = typer.Option("cache"),
) -> None:
    """Decode engine vs the TransformerLens and nnsight recipes vs the fp32 GEMM floor, in one process."""
    from entropylens.bench import BenchConfig, run_bench

    for name, value in (("batch", batch), ("seq", seq), ("tokens", tokens), ("repeats", repeats)):
        if value <= 0:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    cfg = BenchConfig(model=model, batch=batch, seq=seq, sites=tuple(sites.split(",")),
                      methods=tuple(methods.split(",")), vocab=vocab, d_model=d_model, tokens=tokens,
                      threads=threads, repeats=repeats, cache=Path(cache))
    df = run_bench(cfg)
    heads = {"method": "method", "seconds": "s", "tokens_per_s": "tok/s", "gflops": "GFLOP/s",
             "max_abs_dH": "max|ΔH|", "peak_extra_gib": "peak GiB", "x_faster_recipe": "× recipe",
             "frac_floor_flops": "of floor"}
    a, mc = df.attrs, df.attrs["machine"]
    wide = Console(width=max(out.width, 130))  # never truncate a column or wrap the header, even when piped
    wide.print(f"CPU {mc['cpu']} · ISA {mc['isa']} · torch kernels {mc['torch_isa']} · {mc['threads']} threads · "
              f"torch {mc['torch']}")
    wide.print(f"default decode path: {a['default_kernel']} kernel (first-use build {a['native_build_s']} s); "
              f"compile_s {a['compile_s']} for entropylens-compiled")
    table = Table(title=f"entropylens bench · {df.attrs['tokens']} tokens · d {df.attrs['d_model']} · "
                  f"V {df.attrs['vocab']} · sites {df.attrs['sites']}", title_justify="left")
    for col in df.columns:
        table.add_column(heads.get(col, str(col)), justify="left" if col == "method" else "right", no_wrap=True)
    for row in df.itertuples(index=False):
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    wide.print(table)


def _bupo_defaults():
    from entropylens.bupo.pipeline import BupoRunConfig

    return BupoRunConfig()


_B = _bupo_defaults()  # the command's defaults are the config's: written once, in entropylens/bupo/pipeline.py


@app.command()
def bupo(
    model: str = typer.Option(_B.model, help="`smollm2` (embedded), a local folder, a .gguf file or a hub id"),
    prompts: str = typer.Option(_B.prompts, help="training prompts: built-in set (train split) or a prompt file"),
    eval_prompts_source: str = typer.Option(None, "--eval-source", help="held-out prompts (default: test split)"),
    algo: str = typer.Option(_B.algo, help="bupo (train pi^k first) | grpo (no internal phase)"),
    layer: str = typer.Option(_B.layer, help="k (1-indexed) or auto: last layer with positive mean FFN dH "
                              "(SmolLM2 has none, hence the default 15 of its 30)"),
    internal_steps: int = typer.Option(None, help="steps on pi^k first (default: steps // 4; grpo: 0)"),
    steps: int = typer.Option(_B.steps, help="total optimiser steps"),
    prompts_per_step: int = typer.Option(_B.prompts_per_step, help="B: prompts per step (over all processes)"),
    num_generations: int = typer.Option(_B.num_generations, "--num-generations", "-G", help="G: rollouts per prompt"),
    max_new_tokens: int = typer.Option(_B.max_new_tokens, help="completion cap (training, evaluation, traces)"),
    temperature: float = typer.Option(_B.temperature, help="sampling temperature"),
    lr: float = typer.Option(_B.learning_rate, help="AdamW learning rate (paper: 1e-6 over many more steps)"),
    weight_decay: float = typer.Option(_B.weight_decay, help="AdamW weight decay"),
    beta: float = typer.Option(_B.beta, help="KL penalty to the initial model"),
    micro_batch_size: int = typer.Option(_B.micro_batch_size, help="rollouts per forward/backward chunk"),
    group_sampling: bool = typer.Option(_B.group_sampling, help="one seeded generate per prompt, as under torchrun "
                                        "(samples independent of rank and batch; slower on CPU)"),
    reward: str = typer.Option(_B.reward, help=RULES_HELP),
    save_every: int = typer.Option(_B.save_every, help="write the resumable training state every N steps "
                                   "(and on Ctrl-C); 0 = only on Ctrl-C"),
    train_prompts: str = typer.Option("all", help="first N training prompts, or 'all'"),
    layer_trace_prompts: int = typer.Option(_B.layer_trace_prompts, help="training prompts traced to choose k"),
    eval_prompts: int = typer.Option(_B.eval_prompts, help="held-out prompts for Avg@K / Pass@K"),
    eval_samples: int = typer.Option(_B.eval_samples, help="completions per held-out prompt"),
    ks: str = typer.Option(",".join(map(str, _B.ks)), help="comma-separated K values (each <= --eval-samples)"),
    trace_prompts: int = typer.Option(_B.trace_prompts, help="held-out prompts traced before and after training"),
    trace_positions: str = typer.Option(_B.trace_positions, help="response | all: positions decoded in the traces"),
    batch_size: int = typer.Option(_B.batch_size, help="prompts per traced forward / evaluation batch"),
    device: str = typer.Option(_B.device, help="cpu | cuda | cuda:N | auto"),
    dtype: str = typer.Option(_B.dtype, help="float32 | bfloat16 | float16 | float64"),
    seed: int = typer.Option(_B.seed, help="prompt order, sampling, evaluation, traces"),
    name: str = typer.Option(None, help="trainer run id (traces get -layer, -base, -trained suffixes)"),
    cache: str = typer.Option(_B.cache, help="folder holding runs/ and models/"),
    enable_thinking: bool = typer.Option(False, help="Qwen3 chat templates: thinking mode"),
    trust_remote_code: bool = typer.Option(False, help="allow model code from the checkpoint (only when asked)"),
    resume: str = typer.Option(None, help="continue the interrupted run RUN with its stored settings"),
    quiet: bool = typer.Option(False, help="no progress output"),
) -> None:
    """BuPO (or GRPO): choose k, train, save, evaluate and re-trace base vs trained into cache/runs/.

    Data-parallel with `torchrun --nproc-per-node N -m entropylens bupo ...` or `accelerate launch`.
    """
    from entropylens.bupo.checkpoint import Interrupted
    from entropylens.bupo.distributed import rank
    from entropylens.bupo.pipeline import BupoRunConfig, config_from_run, run_bupo

    if resume:
        cfg = config_from_run(cache, resume)
    else:
        try:
            k_values = tuple(int(k) for k in ks.split(",") if k.strip())
        except ValueError:
            raise UserError(f"--ks takes comma-separated integers like 1,4, got {ks!r}") from None
        cfg = BupoRunConfig(
            model=model, prompts=prompts, eval_prompts_source=eval_prompts_source, algo=algo, layer=layer,
            internal_steps=internal_steps, steps=steps, prompts_per_step=prompts_per_step,
            num_generations=num_generations, max_new_tokens=max_new_tokens, temperature=temperature,
            learning_rate=lr, weight_decay=weight_decay, beta=beta, micro_batch_size=micro_batch_size,
            reward=reward, save_every=save_every, group_sampling=group_sampling,
            train_prompts=None if train_prompts == "all" else parse_limit(train_prompts),
            layer_trace_prompts=layer_trace_prompts, eval_prompts=eval_prompts, eval_samples=eval_samples,
            ks=k_values, trace_prompts=trace_prompts, trace_positions=trace_positions, batch_size=batch_size,
            device=device, dtype=dtype, seed=seed, name=name, cache=cache, enable_thinking=enable_thinking,
            trust_remote_code=trust_remote_code,
        )
    try:
        r = run_bupo(cfg, progress=not quiet, resume=bool(resume))
    except Interrupted as e:
        print(f"interrupted after step {e.step}: training state saved; continue with "
              f"`entropylens bupo --resume {e.run_id} --cache {cfg.cache}`", file=sys.stderr)
        sys.exit(130)
    if rank() > 0:  # under torchrun / accelerate launch rank 0 speaks for the job
        return
    print_bupo(r)


@app.command()
def report(
    runs: list[str] = typer.Argument(..., help="run ids under CACHE/runs (one or more)"),
    out: str = typer.Option("report", "-o", "--out", help="output folder (index.html, README.md, figures/, tables/)"),
    cache: str = typer.Option("cache", help="folder holding runs/"),
    role: str = typer.Option("response", help="response | prompt | all tokens"),
    band: float = typer.Option(0.05, help="nats: |mean ΔH| <= band reads as integration"),
    collapse_frac: float = typer.Option(0.10, help="layer-policy collapse threshold as a fraction of log V"),
    images: str = typer.Option("png,svg", help="static image formats (png, svg), or 'none'"),
    title: str = typer.Option("entropylens report", help="report heading"),
    notes: str = typer.Option(None, help="Markdown file included as the discussion"),
    write_stages: bool = typer.Option(True, "--write-stages/--no-write-stages",
                                      help="also write stages.json into each run folder"),
) -> None:
    """Paper-style figures, stage table and a self-contained HTML + Markdown report from cached runs."""
    import shlex

    from entropylens.report import ReportConfig, build_report

    fmts = () if images == "none" else tuple(f.strip() for f in images.split(",") if f.strip())
    command = shlex.join(["entropylens", "report", *runs, "-o", out, "--cache", cache, "--role", role,
                          "--band", f"{band:g}", "--collapse-frac", f"{collapse_frac:g}", "--images", images,
                          "--title", title] + (["--notes", notes] if notes else []))
    index = build_report(ReportConfig(runs=list(runs), out=out, cache=cache, role=role, band=band,
                                      collapse_frac=collapse_frac, images=fmts, write_stages=write_stages,
                                      title=title, notes=notes, command=command))
    out_console = Console()
    out_console.print(f"[bold green]report[/] {index}  ·  {Path(out) / 'README.md'}  ·  {Path(out) / 'figures'}")


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
