"""Data-parallel BuPO: 2 processes over gloo take the same steps as 1 process with the same global batch.

The subprocess tests pay ~10 s of imports per process start; everything else here runs in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import make_char_llama, make_char_tokenizer
from safetensors.torch import load_file

from entropylens.bupo import distributed
from entropylens.bupo.grpo import LOSS_AGGS, LossScale, aggregate_loss, chunk_weight
from entropylens.bupo.rollout import concat_rollouts, generate_groups
from entropylens.model.generation import group_seed
from entropylens.bupo.trainer import BupoConfig
from entropylens.errors import UserError

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}  # tiny.py
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SAME = ("reward/mean", "reward/std", "entropy/layer_k", "entropy/output", "kl/output_vs_internal", "clip/frac",
        "completion/len_mean", "optim/grad_norm")


def run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, cwd=HERE)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "checkpoint" / "model.safetensors"), load_file(b / "checkpoint" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


# --- in process: the pure pieces -------------------------------------------------------------------------

def _shards(x: torch.Tensor, m: torch.Tensor, world: int):
    """Rank blocks of rows, each cut to its own padded length (its longest completion), as ranks hold them."""
    per = x.shape[0] // world
    for r in range(world):
        xs, ms = x[r * per:(r + 1) * per], m[r * per:(r + 1) * per]
        T = int(ms.nonzero()[:, 1].max()) + 1
        yield xs[:, :T], ms[:, :T]


def _sharded_loss(x, m, mode, world, local=False):
    """What DDP optimises: the mean over ranks of each rank's micro-batch-weighted loss."""
    shards = list(_shards(x, m, world))
    scale = LossScale.from_ranks(torch.stack([LossScale.local(ms) for _, ms in shards]))
    total = 0.0
    for xs, ms in shards:
        s = LossScale.of(ms) if local else scale  # local: each rank normalised by its own counts (the bug)
        for c in (slice(0, 2), slice(2, None)):  # uneven micro-batches
            total = total + chunk_weight(ms[c], s, mode) * aggregate_loss(xs[c], ms[c], mode)
    return total / world


@pytest.mark.parametrize("mode", LOSS_AGGS)
def test_sharded_loss_and_gradient_equal_the_global_batch(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 9, generator=g, requires_grad=True)
    lengths = torch.tensor([9, 2, 5, 7, 1, 3, 4, 2, 6, 9, 8, 5])  # rank 1 holds more tokens, rank 0 a shorter T
    m = (torch.arange(9)[None] < lengths[:, None]).float()
    m[:6, 7:] = 0  # rank 0's longest completion has 7 tokens, rank 1's 9
    full = aggregate_loss(x, m, mode)
    (grad_full,) = torch.autograd.grad(full, x)
    for world in (1, 2, 3):
        sharded = _sharded_loss(x, m, mode, world)
        (grad,) = torch.autograd.grad(sharded, x)
        assert sharded.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-7)
        assert torch.allclose(grad, grad_full, atol=1e-7)
    if mode != "seq_mean_token_mean":  # (equal sequences per rank: its local mean happens to be the global one)
        assert _sharded_loss(x, m, mode, 2, local=True).item() != pytest.approx(full.item(), rel=1e-3)


def test_loss_scale_combines_ranks():
    per_rank = torch.stack([LossScale.local(torch.ones(4, 3)), LossScale.local(torch.ones(4, 5).tril())])
    assert LossScale.from_ranks(per_rank) == LossScale(tokens=12 + 10, sequences=8, length=5, world_size=2)


def test_a_group_samples_the_same_completions_in_any_batch():
    model, tok = make_char_llama(), make_char_tokenizer()
    texts = ["1+2=", "what is 40+2?", "7*6", "10-1 ="]
    seeds = [group_seed(0, 3, j) for j in range(4)]
    whole = generate_groups(model, tok, texts, 3, 1.0, 8, seeds)
    halves = [generate_groups(model, tok, texts[s], 3, 1.0, 8, seeds[s]) for s in (slice(0, 2), slice(2, 4))]
    again = concat_rollouts(halves, tok.pad_token_id)
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "mask"):
        assert torch.equal(getattr(whole, field), getattr(again, field)), field
    assert whole.texts == again.texts and whole.mask.sum(1).unique().numel() > 1  # lengths vary
    assert len({group_seed(0, 3, 0), group_seed(0, 3, 1), group_seed(0, 4, 0), group_seed(1, 3, 0)}) == 4


def test_shards_and_one_line_errors():
    assert [distributed.shard(6, r, 3) for r in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    with pytest.raises(UserError, match="divisible by the number of processes"):
        BupoConfig(internal_layer=1, steps=1, internal_steps=0, prompts_per_step=3).validate(2, 4, world_size=2)
    BupoConfig(internal_layer=1, steps=1, internal_steps=0, prompts_per_step=4).validate(2, 4, world_size=2)
    assert distributed.accelerator(cpu=True) is None and distributed.main_only(None, lambda: 7) == 7


# --- subprocesses: torchrun, 2 ranks over gloo --------------------------------------------------------------

@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> tuple[Path, Path]:
    """tests/bupo/dist_step.py (2 steps, each loss aggregation) as 1 process, then as 2 torchrun ranks."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "dist_step.py", str(out / "one"), "2", "1e-4"])
    run([*TORCHRUN, "dist_step.py", str(out / "two"), "2", "1e-4"])
    return out / "one", out / "two"


@pytest.mark.slow
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_two_ranks_take_the_same_steps_as_one_process(one_and_two, loss_agg):
    one, two = (d / loss_agg for d in one_and_two)
    rows1, rows2 = metrics(one), metrics(two)
    assert [r["phase"] for r in rows2] == ["internal", "output"]
    for a, b in zip(rows1, rows2):
        assert b["dist/world_size"] == 2  # ranks hold different token counts, else a rank-local
        assert b["dist/tokens_min_rank"] < b["dist/tokens_max_rank"]  # normalisation would go unnoticed
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and a["loss"] != 0
        for key in SAME:  # metrics reduced over ranks are the one-process values
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    diff = max_weight_diff(one, two)
    initial = make_char_llama(layers=3).state_dict()
    moved = max(float((w.double() - initial[k].double()).abs().max())
                for k, w in load_file(one / "checkpoint" / "model.safetensors").items())
    print(f"{loss_agg}: max |w_1proc - w_2proc| = {diff:.3g} (largest move {moved:.3g})")
    assert diff < 1e-6 and moved > 1e-4
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["distributed"] == {"world_size": 2, "type": "MULTI_CPU", "backend": "gloo", "prompts_per_rank": 2}


@pytest.fixture(scope="module")
def digit_toy(tmp_path_factory) -> Path:
    """The toy model made to answer one-digit sums with (nearly) uniform digits, so exact-match rewards vary."""
    model, tok = make_char_llama(layers=3), make_char_tokenizer()
    digits = tok.convert_tokens_to_ids(list("0123456789"))
    torch.manual_seed(0)
    with torch.no_grad():  # a large constant coordinate 0 rides the residual stream to the head
        model.get_input_embeddings().weight[:, 0] += 10.0
        head = model.get_output_embeddings().weight  # (V, d)
        head.zero_()
        head[digits] = 0.3 * torch.randn(len(digits), head.shape[1])
        head[digits, 0] = 2.5
    folder = tmp_path_factory.mktemp("digit-toy")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "split": "test" if b == 0 else "train"}
            for a in range(5) for b in range(5)]
    (folder / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.mark.slow
def test_cli_under_torchrun_matches_one_process(digit_toy, tmp_path):
    """`entropylens bupo` as 2 ranks: rank 0 alone evaluates, traces and writes; the checkpoint is the 1-process one."""
    args = ["-m", "entropylens", "bupo", "--model", str(digit_toy), "--prompts", str(digit_toy / "sums.jsonl"),
            "--layer", "2", "--internal-steps", "1", "--steps", "2", "--prompts-per-step", "4", "-G", "4",
            "--max-new-tokens", "1", "--lr", "1e-3", "--eval-prompts", "2", "--eval-samples", "2", "--ks", "1,2",
            "--trace-prompts", "2", "--batch-size", "4", "--name", "t"]
    r2 = run([*TORCHRUN, *args, "--cache", str(tmp_path / "two")])
    run([sys.executable, *args, "--cache", str(tmp_path / "one"), "--quiet", "--group-sampling"])
    assert r2.stdout.count("held-out evaluation") == 1  # printed by rank 0 only
    runs = tmp_path / "two" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["t", "t-base", "t-trained"]
    m = json.loads((runs / "t" / "manifest.json").read_text())
    assert m["status"] == "complete" and m["stage"] == "done" and m["distributed"]["world_size"] == 2
    assert (runs / "t" / "eval.json").is_file()
    rows1, rows2 = metrics(tmp_path / "one" / "runs" / "t"), metrics(runs / "t")
    assert any(r["reward/std"] > 0 for r in rows2)  # the gradient is not zero
    assert [r["loss"] for r in rows2] == pytest.approx([r["loss"] for r in rows1], abs=1e-6)
    diff = max_weight_diff(tmp_path / "one" / "runs" / "t", runs / "t")
    print(f"CLI: losses {[r['loss'] for r in rows2]} vs {[r['loss'] for r in rows1]}, max weight diff {diff:.3g}")
    assert diff < 1e-6
