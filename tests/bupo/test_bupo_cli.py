"""`python -m entropylens bupo` end to end on a tiny local model folder, plus its one-line user errors."""

from __future__ import annotations

import json
import signal
import time
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from entropylens.store import layer_table, read_manifest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# one-digit answers, so a one-token completion of a digit-emitting model is right about 1 time in 10
PROBLEMS = [(f"{a}+{b}=", str(a + b)) for a in range(5) for b in range(5)]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entropylens", "bupo", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def digit_folder(tiny_folder, tmp_path_factory) -> Path:
    """`tiny_folder`'s model made to emit (almost) uniform digits, so exact-match rewards vary.

    A random model over SmolLM2's 49k-token vocabulary almost never writes a digit: every reward
    would be 0, every advantage 0 and the weights would never move.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    torch.manual_seed(0)
    with torch.no_grad():  # a large constant coordinate 0 in every embedding rides the residual stream
        model.get_input_embeddings().weight[:, 0] += 10.0
        head = model.get_output_embeddings().weight  # (V, d)
        head.zero_()  # every other token's logit is 0
        head[digits] = 0.3 * torch.randn(len(digits), head.shape[1])
        head[digits, 0] = 2.5  # digits ~e^14 each vs 49k tokens at e^0: ~99 % digits, each ~10 %
    folder = tmp_path_factory.mktemp("digit-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "sums.jsonl"
    rows = [{"prompt": q, "answer": a, "split": "test" if i % 5 == 0 else "train"}
            for i, (q, a) in enumerate(PROBLEMS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bupo_end_to_end(digit_folder, prompt_file, tmp_path):
    cache = tmp_path / "cache"
    r = cli("--model", str(digit_folder), "--prompts", str(prompt_file), "--layer", "2", "--internal-steps", "2",
            "--steps", "4", "--prompts-per-step", "3", "-G", "8", "--max-new-tokens", "1", "--lr", "1e-2",
            "--eval-prompts", "3", "--eval-samples", "2", "--ks", "1,2", "--trace-prompts", "2", "--batch-size", "4",
            "--name", "t", "--cache", str(cache), "--quiet")
    assert r.returncode == 0, r.stderr
    runs = cache / "runs"
    m = read_manifest(runs / "t")
    assert m["kind"] == "bupo" and m["status"] == "complete" and m["bupo"]["layer"] == 2
    assert m["layer_choice"]["mode"] == 2 and m["runs"] == {"layer": None, "base": "t-base", "trained": "t-trained"}

    rows = [json.loads(line) for line in (runs / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [row["phase"] for row in rows] == ["internal", "internal", "output", "output"]
    assert any(row["reward/std"] > 0 for row in rows)  # else nothing could have been learned

    base = AutoModelForCausalLM.from_pretrained(digit_folder).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(runs / "t" / "checkpoint").state_dict()
    assert base.keys() == trained.keys()
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert "lm_head.weight" in moved and "model.layers.0.mlp.down_proj.weight" in moved

    child, parent = read_manifest(runs / "t-trained"), read_manifest(runs / "t-base")
    assert child["parent_run"] == "t-base" and parent["parent_run"] is None
    assert child["status"] == parent["status"] == "complete"
    assert child["prompts"]["sha256"] == parent["prompts"]["sha256"]
    assert m["parent_run"] == "t-base"

    ev = json.loads((runs / "t" / "eval.json").read_text())
    for side in ("base", "trained"):  # avg@1 recomputed from the stored per-sample rewards
        correct = ev[side]["correct"]
        assert len(correct) == 3 and all(len(c) == 2 for c in correct)
        assert ev[side]["avg@1"] == pytest.approx(sum(sum(c) / 2 for c in correct) / 3)
    assert "held-out evaluation" in r.stdout and "layer k = 2: given" in r.stdout
    top = [layer_table(runs / n, lens="bupo", role="response").set_index("layer").loc[3, "H_layer"]
           for n in ("t-base", "t-trained")]
    assert f"{top[1] - top[0]:.3f}" in r.stdout  # the printed before/after change, recomputed


@pytest.mark.parametrize("args,needle", [
    (["--layer", "zero"], "--layer"),
    (["--layer", "0"], "--layer"),
    (["--internal-steps", "5", "--steps", "3"], "--internal-steps"),
    (["--algo", "ppo"], "--algo"),
    (["--algo", "grpo", "--internal-steps", "2"], "grpo"),
    (["--model", "/nonexistent/model"], "model path"),
    (["--prompts", "no-such-set"], "arith"),
    (["--ks", "1,8", "--eval-samples", "4"], "--ks"),
    (["--layer", "9"], "1..3"),  # the tiny model has 3 layers
    (["--objective", "verl"], "objective"),
    (["--mini-batches", "3", "--prompts-per-step", "4"], "mini_batches"),
])
def test_user_mistakes_are_one_line(args, needle, tiny_folder, tmp_path, monkeypatch, capsys):
    """In process (a subprocess per case costs ~10 s of imports); main() is what `entropylens` runs."""
    from entropylens.cli.commands import main

    model = [] if "--model" in args else ["--model", str(tiny_folder)]
    monkeypatch.setattr(sys, "argv", ["entropylens", "bupo", *model, *args, "--cache", str(tmp_path), "--quiet"])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.count("\n") == 0 and err.startswith("error:") and needle in err, err


def _train_args(digit_folder: Path, prompt_file: Path, cache: Path, name: str) -> list[str]:
    return ["--model", str(digit_folder), "--prompts", str(prompt_file), "--layer", "2", "--internal-steps", "3",
            "--steps", "8", "--prompts-per-step", "3", "-G", "8", "--max-new-tokens", "2", "--lr", "1e-2",
            "--save-every", "1", "--eval-prompts", "3", "--eval-samples", "2", "--ks", "1,2", "--trace-prompts",
            "1", "--batch-size", "4", "--name", name, "--cache", str(cache), "--quiet"]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]  # wall-clock rates differ


@pytest.mark.parametrize("how", ["SIGKILL", "SIGINT"])
def test_killed_run_resumes_to_the_same_metrics_and_weights(how, digit_folder, prompt_file, tmp_path):
    """A run stopped mid-training (SIGKILL: no warning; SIGINT: Ctrl-C) and resumed with `--resume` ends with
    the uninterrupted run's metrics.jsonl and weights, as the issue asks (within 1e-6 on CPU)."""
    whole = cli(*_train_args(digit_folder, prompt_file, tmp_path / "a", "r"))
    assert whole.returncode == 0, whole.stderr

    cache, run = tmp_path / "b", tmp_path / "b" / "runs" / "r"
    proc = subprocess.Popen([sys.executable, "-m", "entropylens", "bupo",
                             *_train_args(digit_folder, prompt_file, cache, "r")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # stop it once two steps are saved
        if (run / "state.pt").is_file() and len(_metrics(run)) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be stopped; the test needs more steps"
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    stopped_at = len(_metrics(run))
    assert 2 <= stopped_at < 8 and read_manifest(run)["status"] == "running"
    if how == "SIGINT":  # Ctrl-C finishes the step, saves, and says how to resume
        assert proc.returncode == 130 and f"entropylens bupo --resume r --cache {cache}" in err, err
    else:
        assert proc.returncode == -signal.SIGKILL

    resumed = cli("--resume", "r", "--cache", str(cache), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert _metrics(run) == _metrics(tmp_path / "a" / "runs" / "r")
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "runs" / "r" / "checkpoint").state_dict()
    b = AutoModelForCausalLM.from_pretrained(run / "checkpoint").state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    ev_a, ev_b = (json.loads((c / "runs" / "r" / "eval.json").read_text()) for c in (tmp_path / "a", cache))
    assert ev_a["trained"]["correct"] == ev_b["trained"]["correct"] and ev_a["gain"] == ev_b["gain"]
    assert read_manifest(run)["status"] == "complete" and not (run / "state.pt").exists()


def test_eval_json_carries_intervals_and_the_paired_gain(digit_folder, prompt_file, tmp_path):
    r = cli(*_train_args(digit_folder, prompt_file, tmp_path, "g"), "--steps", "2", "--internal-steps", "1")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "runs" / "g" / "eval.json").read_text())
    for side in ("base", "trained"):
        for m in ("avg@1", "pass@2"):
            lo, hi = ev[side][f"{m}_ci"]
            assert 0.0 <= lo <= ev[side][m] <= hi <= 1.0
    g = ev["gain"]["avg@1"]
    per_prompt = [sum(t) / 2 - sum(b) / 2 for b, t in zip(ev["base"]["correct"], ev["trained"]["correct"])]
    assert g["gain"] == pytest.approx(sum(per_prompt) / 3) and g["lo"] <= g["gain"] <= g["hi"] and g["n"] == 3
    assert "gain" in r.stdout and "95 %" in r.stdout
