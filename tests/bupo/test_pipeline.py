"""run_bupo in process: `--layer auto` picks the last layer with positive mean FFN dH, recomputed from Parquet."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from tiny import make_char_llama, make_char_tokenizer

from entropylens.bupo.config import DEFAULT_LAYER, TRAIN_DEFAULTS, BupoRunConfig
from entropylens.bupo.pipeline import run_bupo
from entropylens.options import build, flatten
from entropylens.errors import UserError
from entropylens.bupo.trainer import BupoConfig
from entropylens.store.folder import RunFolder
from entropylens.store import read_manifest

TINY = dict(steps=2, internal_steps=1, prompts_per_step=2, num_generations=2, max_new_tokens=6,
            layer_trace_prompts=3, eval_prompts=2, eval_samples=2, ks=(1, 2), trace_prompts=2, batch_size=4)


@pytest.fixture(scope="module")
def boundary_folder(tmp_path_factory):
    """A 4-layer toy whose layers 1-2 have near-zero FFN outputs (decoded: near uniform, so dH_ffn > 0)
    while layers 3-4 keep peaked ones (dH_ffn < 0): the boundary is layer 2, not the top layer."""
    model = make_char_llama(layers=4)
    with torch.no_grad():
        for layer in model.model.layers[:2]:
            layer.mlp.down_proj.weight.mul_(1e-3)
    folder = tmp_path_factory.mktemp("boundary")
    model.save_pretrained(folder)
    make_char_tokenizer().save_pretrained(folder)
    return folder


def test_layer_auto_is_last_layer_with_positive_ffn_dh(boundary_folder, tmp_path, monkeypatch):
    statuses, write = [], RunFolder.write_manifest

    def spy(folder):  # every manifest the trainer run's folder writes: its status goes running -> complete once
        if folder.run_dir.name == "r":
            statuses.append(folder.manifest["status"])
        write(folder)

    monkeypatch.setattr(RunFolder, "write_manifest", spy)
    cfg = build(BupoRunConfig, dict(model=str(boundary_folder), layer="auto", cache=str(tmp_path), name="r", **TINY))
    r = run_bupo(cfg, progress=False)
    assert statuses[0] == "running" and statuses[-1] == "complete" and statuses.count("complete") == 1
    entropy = pd.read_parquet(tmp_path / "runs" / "r-layer" / "entropy.parquet")
    assert set(entropy["lens"]) == {"bupo"} and set(entropy["role"]) == {"response"}  # response positions only
    assert entropy["H_attn"].isna().all() and entropy["H_ffn"].notna().any()  # FFN sites only
    mean = entropy.groupby("layer")["dH_ffn"].mean().dropna()  # independent of store.layer_table
    positive = mean[mean > 0]
    assert list(positive.index) == [1, 2]  # the construction worked
    assert r.layer == positive.index.max() == 2 and r.layer_run == "r-layer"

    m = read_manifest(tmp_path / "runs" / "r")
    assert m["layer_choice"]["layer"] == 2 and m["layer_choice"]["trace_run"] == "r-layer"
    assert f"{positive.loc[2]:+.3f}" in m["layer_choice"]["evidence"]
    assert json.loads((tmp_path / "runs" / "r" / "config.json").read_text())["internal_layer"] == 2
    assert json.loads((tmp_path / "runs" / "r" / "run_config.json").read_text())["layer_choice"]["layer"] == 2
    assert m["bupo"]["internal_steps"] == 1 and m["status"] == "complete" and m["parent_run"] == "r-base"


def test_the_command_embeds_the_trainer_config_with_its_own_defaults():
    """Each trainer knob is declared once (on BupoConfig); the command holds a BupoConfig, not copies of its fields."""
    cfg = build(BupoRunConfig, dict(steps=9, num_generations=3, learning_rate=1e-3, seed=7, max_new_tokens=5,
                                    save_every=2, epsilon_high=0.28, name="x"))
    b = cfg.trainer_config(4, model_id="m", parent_run="p")
    assert (b.internal_layer, b.internal_steps, b.model_id, b.parent_run) == (4, 2, "m", "p")
    assert (b.steps, b.num_generations, b.learning_rate, b.seed, b.max_new_tokens, b.save_every, b.epsilon_high) == (
        9, 3, 1e-3, 7, 5, 2, 0.28)
    assert b.loss_agg == BupoConfig.loss_agg and b.prompts_per_step == TRAIN_DEFAULTS.prompts_per_step
    assert not set(BupoConfig.__dataclass_fields__) & set(BupoRunConfig.__dataclass_fields__) - {"internal_steps"}
    default = BupoRunConfig()  # the command's defaults differ from the paper's, and apply where not given
    assert default.layer == DEFAULT_LAYER and default.train.learning_rate == 2e-5 != BupoConfig.learning_rate
    assert BupoRunConfig().train is not BupoRunConfig().train  # no shared mutable default
    assert build(BupoRunConfig, flatten(cfg)) == cfg  # what run_config.json stores rebuilds the config


def test_grpo_has_no_internal_phase_and_no_positive_layer_is_a_user_error(tmp_path):
    cfg = build(BupoRunConfig, dict(algo="grpo", steps=5))
    assert cfg.resolved_internal_steps() == 0 and build(BupoRunConfig, dict(steps=9)).resolved_internal_steps() == 2
    folder = tmp_path / "m"
    make_char_llama(layers=2).save_pretrained(folder)  # random toy: every FFN sharpens (dH_ffn < 0)
    make_char_tokenizer().save_pretrained(folder)
    with pytest.raises(UserError, match="no layer has a positive"):
        cfg = build(BupoRunConfig, dict(model=str(folder), layer="auto", cache=str(tmp_path / "c"), name="g", **TINY))
        run_bupo(cfg, progress=False)
    assert not (tmp_path / "c" / "runs" / "g").exists()  # nothing trained
