"""Faults during a trace: SIGKILL at random points, Ctrl-C, a full disk. Nothing lost, nothing looks complete."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from harness import FAST, assert_same_run, one_line, popen, run_main
from entropylens import store
from entropylens.store import folder as runfolder
from entropylens.errors import UserError

N_BATCHES = 16  # enough batches that a kill lands mid-run even on a fast, idle machine
_REAL_COMMIT = runfolder._commit


def done_batches(run: Path) -> int:
    return len(list((run / "parts").glob("responses-*.jsonl")))


def wait_for(cond, proc, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not cond():
        time.sleep(0.05)


def assert_nothing_looks_complete(run: Path) -> None:
    """After a crash: status not complete, readers refuse the run, every part file present is whole."""
    m = store.read_manifest(run)
    assert m["status"] in ("running", "failed"), m["status"]
    with pytest.raises(UserError, match="not complete"):
        store.load_summary(run)
    with pytest.raises(UserError, match="not complete"):
        store.load_tokens(run)
    for part in (run / "parts").glob("*.parquet"):  # atomic renames: a visible part is a complete file
        pq.read_table(part)
    for part in (run / "parts").glob("*.jsonl"):
        [json.loads(line) for line in part.read_text().splitlines()]


@pytest.mark.reliability
def test_sigkill_at_random_points_then_resume_is_identical(small_folder, tmp_path, reference, monkeypatch, capsys):
    """Kill 1: some time after the manifest appears (model load or first batch); kill 2: in a later batch."""
    rng = random.Random(1234)
    cache, run = tmp_path / "cache", tmp_path / "cache" / "runs" / "k"
    common = ["--cache", str(cache)]
    points = [lambda: (run / "manifest.json").exists(), lambda: done_batches(run) >= 2]
    for i, point in enumerate(points):
        args = ["--resume", "k"] if i else ["--model", str(small_folder), *FAST, "--name", "k"]
        proc = popen("trace", *args, *common)
        wait_for(point, proc)
        time.sleep(rng.uniform(0.0, 0.1))  # anywhere inside a batch: mid-write, mid-decode
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
        assert_nothing_looks_complete(run)
    before = done_batches(run)
    assert before < N_BATCHES

    code, out, err = run_main(monkeypatch, capsys, "trace", "--resume", "k", *common, "--quiet")
    assert code == 0, err
    assert store.read_manifest(run)["status"] == "complete" and not (run / "parts").exists()
    assert not list(run.rglob("*.tmp"))
    assert_same_run(run, reference)


@pytest.mark.reliability
def test_sigint_stops_with_one_line_and_resumes(small_folder, tmp_path, reference, monkeypatch, capsys):
    cache, run = tmp_path / "cache", tmp_path / "cache" / "runs" / "i"
    proc = popen("trace", "--model", str(small_folder), *FAST, "--name", "i", "--cache", str(cache))
    wait_for(lambda: done_batches(run) >= 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = one_line(err)
    assert line == f"interrupted: run i kept; finish it with `entropylens trace --resume i --cache {cache}`"
    assert store.read_manifest(run)["status"] in ("failed", "running")
    assert_nothing_looks_complete(run)

    code, _, err = run_main(monkeypatch, capsys, "trace", "--resume", "i", "--cache", str(cache), "--quiet")
    assert code == 0, err
    assert_same_run(run, reference)
    code, _, err = run_main(monkeypatch, capsys, "trace", "--resume", "i", "--cache", str(cache), "--quiet")
    assert code == 2 and "already complete" in one_line(err)


def _full_disk_from(monkeypatch, trigger: str, persistent: bool) -> list[str]:
    """Make store writes fail with ENOSPC from the first file whose name contains `trigger` on.

    The failure hits `_commit` (after the data went to `*.tmp`, before the rename), as a full disk would
    at fsync; `persistent` keeps the disk full, so the writer cannot even record the failure.
    """
    real, hits = runfolder._commit, []

    def commit(tmp: Path, path: Path) -> None:
        if trigger in tmp.name or (persistent and hits):
            hits.append(tmp.name)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
        real(tmp, path)

    monkeypatch.setattr(runfolder, "_commit", commit)
    return hits


@pytest.mark.parametrize("trigger,persistent", [("tokens-00002", False), ("tokens-00002", True),
                                                ("entropy.parquet", False)])
def test_disk_full_stops_with_one_line_keeps_batches_and_resumes(small_folder, tmp_path, reference, monkeypatch,
                                                                 capsys, trigger, persistent):
    cache, run = tmp_path / "cache", tmp_path / "cache" / "runs" / "d"
    hits = _full_disk_from(monkeypatch, trigger, persistent)
    code, out, err = run_main(monkeypatch, capsys, "trace", "--model", str(small_folder), *FAST, "--name", "d",
                              "--cache", str(cache))
    assert code == 2 and hits
    line = one_line(err)
    assert line.startswith(f"error: cannot write run folder {run}: [Errno {errno.ENOSPC}] No space left on device")
    assert "--resume d" in line
    m = store.read_manifest(run)
    # the writer records the error when it can; with the disk still full the manifest stays `running`
    assert m["status"] == "running" if persistent else m["error"].startswith("OSError: [Errno 28] No space left")
    assert_nothing_looks_complete(run)
    finalize = trigger == "entropy.parquet"
    assert done_batches(run) == (N_BATCHES if finalize else 2)  # batches 0 and 1 intact
    if finalize:
        assert (run / "tokens.parquet").exists()  # merged before the failure, yet not readable as complete

    monkeypatch.setattr(runfolder, "_commit", _REAL_COMMIT)  # space freed
    code, _, err = run_main(monkeypatch, capsys, "trace", "--resume", "d", "--cache", str(cache), "--quiet")
    assert code == 0, err
    assert not list(run.rglob("*.tmp"))
    assert_same_run(run, reference)

