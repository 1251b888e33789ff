"""The real CLI in subprocesses: end to end on a tiny local model, one-line errors, a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from entropylens.store import read_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entropylens", *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


def test_trace_runs_show_compare_end_to_end(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    common = ["--model", str(tiny_folder), "--limit", "3", "--max-new-tokens", "5", "--batch-size", "2",
              "--cache", str(cache), "--quiet"]
    r = cli("trace", *common, "--name", "a", "--lens", "both")
    assert r.returncode == 0, r.stderr
    assert "complete" in r.stdout and "H_layer" in r.stdout
    run = cache / "runs" / "a"
    for f in ("manifest.json", "tokens.parquet", "entropy.parquet", "summary.parquet", "responses.jsonl"):
        assert (run / f).is_file(), f
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["model"]["source"] == "folder" and m["lens"] == ["bupo", "logit"]
    assert m["prompts"]["n"] == 3 and len((run / "responses.jsonl").read_text().splitlines()) == 3
    assert cli("trace", *common, "--name", "b", "--seed", "1").returncode == 0

    listing = cli("runs", "--cache", str(cache))
    rows = [line.split("│") for line in listing.stdout.splitlines() if "│" in line]
    listed = {cells[1].strip(): [c.strip() for c in cells] for cells in rows}  # run_id -> cells (header: ┃)
    assert listing.returncode == 0 and set(listed) == {"a", "b"}, listing.stdout
    assert all("complete" in cells for cells in listed.values())
    shown = cli("show", "a", "--cache", str(cache), "--lens", "bupo")
    assert shown.returncode == 0
    # the printed table is the stored summary: check one number
    summ = pd.read_parquet(run / "summary.parquet")
    row = summ[(summ.lens == "bupo") & (summ.layer == 1) & (summ.quantity == "H_layer") & (summ.role == "response")]
    assert f"{row['mean'].iloc[0]:.3f}" in shown.stdout
    diff = cli("compare", "a", "b", "--cache", str(cache))
    assert diff.returncode == 0 and "b − a" in diff.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "model path"),
    (["--model", "nonexistent-org/nonexistent-model-xyz"], "hub could not provide it"),
    (["--prompts", "missing.jsonl"], "missing.jsonl"),
    (["--prompts", "empty.jsonl"], "empty"),
    (["--prompts", "wrong.csv"], "column"),
    (["--prompts", "no-such-set"], "arith"),
    (["--max-new-tokens", "-1"], "max-new-tokens"),
    (["--limit", "0"], "limit"),
    (["--lens", "tuned"], "lens"),
    (["--sites", "attn,mlp"], "site"),
    (["--cache", "afile/cache"], "not writable"),
])
def test_user_errors_are_one_line(tmp_path, tiny_folder, args, needle, monkeypatch, capsys):
    """In-process through cli.main (the console script's own entry); the first case also as a subprocess."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "wrong.csv").write_text("colour,size\nred,3\n")
    (tmp_path / "afile").write_text("x")
    base = {"--model": str(tiny_folder), "--cache": str(tmp_path / "cache"), "--limit": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = ["trace", *[x for kv in base.items() for x in kv], "--quiet"]
    if args[0] == "--model" and args[1].startswith("/"):
        r = cli(*argv, cwd=tmp_path)
        code, stdout, stderr = r.returncode, r.stdout, r.stderr
    else:
        from entropylens.cli.commands import main

        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["entropylens", *argv])
        with pytest.raises(SystemExit) as exc:
            main()
        code = exc.value.code
        stdout, stderr = capsys.readouterr()
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], stderr
    assert "Traceback" not in stderr + stdout
    runs = tmp_path / "cache" / "runs"
    assert not any((p / "tokens.parquet").exists() for p in runs.glob("*")) if runs.exists() else True


def test_killed_run_stays_running_and_resumes(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    args = ["--model", str(tiny_folder), "--limit", "12", "--batch-size", "1", "--max-new-tokens", "4",
            "--cache", str(cache), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "entropylens", "trace", *args, "--name", "k"], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = cache / "runs" / "k" / "parts"
    deadline = time.time() + 240
    while time.time() < deadline and not list(parts.glob("responses-*.jsonl")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = cache / "runs" / "k"
    assert read_manifest(run)["status"] == "running"
    assert not (run / "tokens.parquet").exists() and not (run / "summary.parquet").exists()

    r = cli("trace", "--resume", "k", "--cache", str(cache), "--quiet")
    assert r.returncode == 0, r.stderr
    assert read_manifest(run)["status"] == "complete"
    assert cli("trace", *args, "--name", "straight").returncode == 0
    a = pd.read_parquet(run / "entropy.parquet")
    b = pd.read_parquet(cache / "runs" / "straight" / "entropy.parquet")
    pd.testing.assert_frame_equal(a, b)


def _listed(stdout: str) -> set[str]:
    """Run ids in `entropylens runs`'s table (header rows use ┃, body rows │)."""
    return {line.split("│")[1].strip() for line in stdout.splitlines() if "│" in line}


def test_runs_folder_apart_from_the_cache(tiny_folder, tmp_path, monkeypatch):
    """`--runs B`: run folders go to B and every command that reads runs finds them there (resume included);
    `--cache A` keeps the rest (here the prompt list the API saves); the manifest does not record B."""
    import entropylens as el
    from entropylens.tracing import job

    a, b = tmp_path / "A", tmp_path / "B"
    where = ["--cache", str(a), "--runs", str(b)]
    r = cli("trace", "--model", str(tiny_folder), "--limit", "2", "--max-new-tokens", "4", "--quiet", *where,
            "--name", "apart")
    assert r.returncode == 0, r.stderr
    assert (b / "apart" / "summary.parquet").is_file() and not (a / "runs").exists()
    assert "runs_dir" not in read_manifest(b / "apart")["config"]
    listing = cli("runs", *where)
    assert listing.returncode == 0 and _listed(listing.stdout) == {"apart"}, listing.stdout
    assert "no runs in" in cli("runs", "--cache", str(a)).stdout
    shown = cli("show", "apart", *where, "--lens", "bupo")
    assert shown.returncode == 0 and "H_layer" in shown.stdout, shown.stderr
    report = cli("report", "apart", *where, "-o", str(tmp_path / "report"), "--images", "none")
    assert report.returncode == 0 and (tmp_path / "report" / "index.html").is_file(), report.stderr
    assert "--runs" in (tmp_path / "report" / "README.md").read_text()  # the 'regenerate with' line
    assert el.load("apart", cache=str(a), runs_dir=str(b)).path == (b / "apart").resolve()

    real, calls = job.trace_batch, []

    def cut_short(engine, seqs):  # the second batch fails: the run stays resumable
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cut short")
        return real(engine, seqs)

    monkeypatch.setattr(job, "trace_batch", cut_short)
    with pytest.raises(RuntimeError, match="cut short"):
        el.trace(str(tiny_folder), ["What is 2 + 3?", "Name a colour."], cache=str(a), runs_dir=str(b), name="cut",
                 max_new_tokens=4, batch_size=1, quiet=True)
    assert read_manifest(b / "cut")["status"] == "failed" and len(list((a / "prompts").glob("*.jsonl"))) == 1
    resumed = cli("trace", "--resume", "cut", *where, "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert read_manifest(b / "cut")["status"] == "complete" and len(pd.read_json(b / "cut" / "responses.jsonl",
                                                                                lines=True)) == 2
    assert not (a / "runs").exists() and not (b / "prompts").exists()


@pytest.mark.parametrize("command", [["runs"], ["show", "x"], ["compare", "x", "y"], ["report", "x"]])
def test_a_missing_runs_folder_is_one_line(command, tmp_path, monkeypatch, capsys):
    from entropylens.cli.commands import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["entropylens", *command, "--runs", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as exc:
        main()
    stdout, stderr = capsys.readouterr()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "nowhere" in lines[0], stderr
    assert "Traceback" not in stdout + stderr


def test_verbose_logs_the_decode_kernel_and_backend(tiny_folder, tmp_path):
    """Diagnostics are logging records: `-v` shows INFO lines on stderr (the kernel and backend chosen among
    them); without it stderr stays as it was (`--quiet`: empty)."""
    args = ["trace", "--model", str(tiny_folder), "--limit", "1", "--max-new-tokens", "2", "--cache", str(tmp_path),
            "--quiet"]
    quiet = cli(*args, "--name", "plain")
    assert quiet.returncode == 0 and quiet.stderr.strip() == "", quiet.stderr
    loud = cli("-v", *args, "--name", "loud")
    assert loud.returncode == 0, loud.stderr
    kernel = [ln for ln in loud.stderr.splitlines() if ln.startswith("INFO ") and "decode kernel" in ln]
    assert len(kernel) == 1 and "backend nnsight" in kernel[0], loud.stderr
    assert "DEBUG" not in loud.stderr and "Traceback" not in loud.stderr



def test_logging_is_configured_once_one_line_per_record_on_the_stderr_of_the_moment(capsys):
    """A rich progress bar swaps sys.stderr while it runs: records follow it (and land above the bar)."""
    import contextlib
    import io
    import logging

    from entropylens.cli.logs import configure_logging

    package, log = logging.getLogger("entropylens"), logging.getLogger("entropylens.probe")
    swapped = io.StringIO()
    try:
        configure_logging(1)
        configure_logging(2)  # replaces the first: one handler, DEBUG
        log.debug("seen")
        configure_logging(0)
        log.info("hidden")
        with contextlib.redirect_stderr(swapped):
            log.warning("shown")
        assert len(package.handlers) == 1
    finally:
        package.handlers.clear()
        package.setLevel(logging.NOTSET)
    assert capsys.readouterr().err.splitlines() == ["DEBUG entropylens.probe: seen"]
    assert swapped.getvalue() == "WARNING entropylens.probe: shown\n"

HEAVY = ("torch", "transformers", "plotly", "dash", "nnsight")
HELP_PROBE = """
import sys, time
t0 = time.perf_counter()
sys.argv = ["entropylens", *sys.argv[1:]]
from entropylens.cli.commands import main
try:
    main()
except SystemExit:
    pass
print("IMPORTED", sorted(m for m in {heavy} if m in sys.modules), round(time.perf_counter() - t0, 3))
"""


@pytest.mark.parametrize("args", [["--help"], ["trace", "--help"], ["bupo", "--help"], ["report", "--help"],
                                  ["bench", "--help"], ["app", "--help"]])
def test_help_imports_no_heavy_library(args):
    """`entropylens --help` (and each command's) reads only the light configs: no torch, transformers or plotly."""
    r = subprocess.run([sys.executable, "-c", HELP_PROBE.format(heavy=HEAVY), *args], capture_output=True,
                       text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("IMPORTED []"), line
