"""The report: self-contained HTML (plotly inlined, no external URLs), Markdown, tables, stages.json,
and the `entropylens report` command — on synthetic runs whose FFN boundary is set by construction."""

from __future__ import annotations

import json
import re
import sys

import pandas as pd
import pytest

from plotly.offline import get_plotlyjs

from entropylens.errors import UserError
from entropylens.analysis.report import ReportConfig, build_report, depth_layers, paper_checks
from synthetic import SyntheticRun, write_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    write_run(root, SyntheticRun("llama-a", n_layers=8, boundary=5, lenses=("bupo", "logit"), n_prompts=4))
    write_run(root, SyntheticRun("qwen-b", family="qwen3", n_layers=6, boundary=2, n_prompts=4))
    return root


def test_report_files_and_self_contained_html(cache, tmp_path):
    out = tmp_path / "rep"
    index = build_report(ReportConfig(runs=["llama-a", "qwen-b"], cache=str(cache), out=str(out), images=(),
                                      band=0.0, command="entropylens report llama-a qwen-b"))
    page = index.read_text()
    assert get_plotlyjs() in page  # plotly.js inlined (its own text holds links to plotly.com: not loads)
    rest = page.replace(get_plotlyjs(), "")
    # self-contained: no <script src=...>, no <link ...>, no remote URL in a src/href attribute
    assert not re.search(r"<script[^>]*\bsrc=", rest) and "<link" not in rest
    assert not re.search(r"""(src|href)=["']?https?://""", rest)
    # 4 figures per (run, lens) + 1 families figure per lens: (2 + 1) * 4 + 2
    assert len(re.findall(r"Plotly\.newPlot\(", page)) == 14
    assert "entropylens report llama-a qwen-b" in page
    md = (out / "README.md").read_text()
    assert "boundary layer 5 of 8" in md and "boundary layer 2 of 6" in md
    stages = json.loads((cache / "runs" / "llama-a" / "stages.json").read_text())
    assert stages["lenses"]["bupo"]["boundary_layer"] == 5 and stages["lenses"]["logit"]["boundary_layer"] == 5
    table = pd.read_csv(out / "tables" / "stages.csv")
    # band 0: the readings are the signs the synthetic profile is built with (positive up to the boundary)
    ffn = table[(table["run_id"] == "llama-a") & (table["lens"] == "bupo") & (table["module"] == "ffn")]
    assert list(zip(ffn["reading"], ffn["start"], ffn["end"])) == [("exploration", 1, 5), ("convergence", 6, 8)]
    layers = pd.read_csv(out / "tables" / "layers-qwen-b-bupo.csv")
    assert list(layers["layer"]) == list(range(1, 7))
    assert not list((out / "figures").iterdir())  # images=() writes none


def test_notes_and_no_stage_write(cache, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("## Discussion\n\nSmolLM2 <agrees> in `part`.\n\n- first point\n")
    build_report(ReportConfig(runs=["qwen-b"], cache=str(cache), out=str(tmp_path / "r"), images=(),
                              notes=str(notes), write_stages=False, title="T"))
    page = (tmp_path / "r" / "index.html").read_text()
    assert "<h3>Discussion</h3>" in page and "&lt;agrees&gt; in <code>part</code>" in page
    assert "<li>first point</li>" in page
    assert "## Discussion" in (tmp_path / "r" / "README.md").read_text()


def test_paper_checks_follow_construction(cache, tmp_path):
    from entropylens.analysis.stages import run_stages

    st = run_stages(cache / "runs" / "llama-a")["lenses"]["bupo"]
    checks = {c["claim"]: c["agrees"] for c in paper_checks(st)}
    assert checks["FFN ΔH negative at the final layer"] is True  # synthetic: convergence after the boundary
    assert checks["FFN ΔH positive until the final layer"] is False  # 5 of 7 inner layers positive (< 80 %)
    assert depth_layers(8) == {"early": 2, "middle": 4, "late": 8} and depth_layers(1)["early"] == 1


def test_user_errors(cache, tmp_path):
    with pytest.raises(UserError, match="image format"):
        build_report(ReportConfig(runs=["qwen-b"], cache=str(cache), out=str(tmp_path), images=("gif",)))
    with pytest.raises(UserError):
        build_report(ReportConfig(runs=["missing"], cache=str(cache), out=str(tmp_path), images=()))
    with pytest.raises(UserError, match="at least one"):
        build_report(ReportConfig(runs=[], cache=str(cache), out=str(tmp_path)))


def test_cli_report(cache, tmp_path, monkeypatch, capsys):
    from entropylens.cli.commands import main

    out = tmp_path / "cli"
    monkeypatch.setattr(sys, "argv", ["entropylens", "report", "qwen-b", "-o", str(out), "--cache", str(cache),
                                      "--images", "none", "--band", "0.2"])
    main()
    assert (out / "index.html").is_file() and "--band 0.2" in (out / "README.md").read_text()
    monkeypatch.setattr(sys, "argv", ["entropylens", "report", "nope", "--cache", str(cache), "-o", str(out)])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_scored_run_gets_auroc_heatmap_best_five_and_its_n(tmp_path):
    from entropylens.analysis.outcomes import auroc_table

    root = tmp_path / "cache"
    run = write_run(root, SyntheticRun("scored", n_layers=4, n_prompts=30, correct_frac=0.5, seed=3))
    out = tmp_path / "rep"
    index = build_report(ReportConfig(runs=["scored"], cache=str(root), out=str(out), images=(), write_stages=False))
    md, page = (out / "README.md").read_text(), index.read_text()
    outcomes = pd.read_parquet(run / "outcomes.parquet")
    n_c, n_w = int(outcomes.correct.sum()), int((~outcomes.correct).sum())
    assert f"Rests on {n_c} correct and {n_w} wrong responses from 30 prompts" in md
    assert "auroc-scored-bupo" in page and "outcome-scored-bupo" in page
    table = pd.read_csv(out / "tables" / "auroc-scored.csv")
    best = table.assign(gap=(table.auroc - 0.5).abs()).nlargest(5, "gap")
    rows = [line for line in md.splitlines() if line.startswith("| bupo |")]
    assert len(rows) == 5 and rows[0].startswith(f"| bupo | {best.iloc[0].site} | {best.iloc[0].layer} |")
    assert best.iloc[0].site == "ffn" and best.iloc[0].layer >= 2  # the construction: wrong FFNs explore more
    pd.testing.assert_frame_equal(table, auroc_table(run), check_dtype=False)
    # baselines: response length is the same for every synthetic response, so its AUROC is exactly 0.5
    assert "response length 0.500 [0.500, 0.500]" in md and "output entropy H_final" in md


def test_notes_are_commonmark_with_tables_and_raw_html_escaped(cache, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("| model | boundary |\n|---|---|\n| `llama-a` | 5 |\n\n<script>alert(1)</script>\n\n"
                     "Inline <b>bold</b> and `a < b`.\n")
    index = build_report(ReportConfig(runs=["qwen-b"], cache=str(cache), out=str(tmp_path / "r"), images=(),
                                      notes=str(notes), write_stages=False))
    page = index.read_text()
    assert "<table>" in page and "<th>model</th>" in page and "<td><code>llama-a</code></td>" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert(1)" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<code>a &lt; b</code>" in page
