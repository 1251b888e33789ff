"""Reading a run's top-K lists (topk.parquet): the logit-lens grid's data, token tracking, `show --topk`.

Why a module: the CLI, `Run`, the report and the dashboard's grid view ask the same questions of the same
long table — "what does each layer's policy say at position t" and "where does token x rank, layer by
layer" — and must answer them identically (rank beyond the stored K reads as missing, "> K").
"""

from __future__ import annotations

import pandas as pd

from entropylens.errors import UserError
from entropylens.store.schema import SITES


def check_topk(topk: pd.DataFrame, run_id: str) -> int:
    """K of a run's top-K table; a run traced with `--topk 0` (or before top-K existed) is a one-line error."""
    if topk.empty:
        raise UserError(f"run {run_id} has no top-K lists (traced with --topk 0, or before top-K was stored); "
                        "re-trace it with --topk K")
    return int(topk["rank"].max())


def at_position(topk: pd.DataFrame, lens: str, prompt: int, position: int) -> pd.DataFrame:
    """One (lens, prompt, position): rows (site, layer, rank, token_id, token_text, prob), sites in SITES order."""
    sel = topk[(topk["lens"] == lens) & (topk["prompt_idx"] == prompt) & (topk["position"] == position)]
    if sel.empty:
        have = topk[(topk["lens"] == lens) & (topk["prompt_idx"] == prompt)]["position"]
        span = f"positions {have.min()}..{have.max()}" if len(have) else "no positions"
        raise UserError(f"no top-K rows for lens {lens!r}, prompt {prompt}, position {position} (it has {span})")
    order = {s: i for i, s in enumerate(SITES)}
    return sel.sort_values(["site", "layer", "rank"], key=lambda s: s.map(order) if s.name == "site" else s)


def grid_cells(topk: pd.DataFrame, lens: str, site: str, prompt: int) -> pd.DataFrame:
    """The grid of one (lens, site, prompt): one row per (layer, position) with the top-K as lists, best first:
    columns layer, position, ids, texts, probs."""
    sel = topk[(topk["lens"] == lens) & (topk["site"] == site) & (topk["prompt_idx"] == prompt)]
    sel = sel.sort_values(["layer", "position", "rank"])
    g = sel.groupby(["layer", "position"], sort=True)
    return pd.DataFrame({"ids": g["token_id"].agg(list), "texts": g["token_text"].agg(list),
                         "probs": g["prob"].agg(list)}).reset_index()


def track(topk: pd.DataFrame, token_id: int, lens: str, site: str, prompt: int) -> pd.DataFrame:
    """Rank (1 = top) and probability of `token_id` in every (layer, position) policy of one (lens, site, prompt),
    from the stored lists: rank and prob are NaN where the token is not among the top K ("> K")."""
    sel = topk[(topk["lens"] == lens) & (topk["site"] == site) & (topk["prompt_idx"] == prompt)]
    cells = sel[["layer", "position"]].drop_duplicates()
    hit = sel[sel["token_id"] == token_id][["layer", "position", "rank", "prob"]]
    out = cells.merge(hit, on=["layer", "position"], how="left").sort_values(["layer", "position"])
    return out.astype({"rank": "float64", "prob": "float64"}).reset_index(drop=True)


def first_entry(tracked: pd.DataFrame, within: int) -> pd.DataFrame:
    """Per position, the first (lowest) layer where the tracked token is within the top `within` (NaN: never)."""
    ok = tracked[tracked["rank"] <= within]
    first = ok.groupby("position")["layer"].min()
    return first.reindex(sorted(tracked["position"].unique())).rename("first_layer").reset_index()


def with_entropy(cells: pd.DataFrame, entropy: pd.DataFrame, site: str) -> pd.DataFrame:
    """grid_cells rows plus column H: the site's entropy from entropy.parquet rows (layer, position, H_<site>)."""
    h = entropy[["layer", "position", f"H_{site}"]].rename(columns={f"H_{site}": "H"})
    return cells.merge(h, on=["layer", "position"], how="left")


def resolve_token(token: int | str, topk: pd.DataFrame) -> tuple[int, str]:
    """A token to track, given as an id or as its text (matched exactly, else after stripping whitespace,
    against the texts in the stored lists): (id, label)."""
    if isinstance(token, (int,)) or (isinstance(token, str) and token.strip().lstrip("-").isdigit()
                                     and token.strip() not in set(topk["token_text"])):
        tid = int(token)
        texts = topk.loc[topk["token_id"] == tid, "token_text"]
        return tid, f"id {tid}" + (f" {texts.iloc[0]!r}" if len(texts) else "")
    for match in (topk["token_text"] == token, topk["token_text"].str.strip() == str(token).strip()):
        ids = topk.loc[match, "token_id"]
        if len(ids):
            tid = int(ids.value_counts().idxmax())
            return tid, f"{token!r} (id {tid})"
    raise UserError(f"token {token!r} is in no stored top-K list of this run; give its id instead")


def guess_answer_token(answer: str | None, vocab: pd.Series) -> str | None:
    """The stored token text that is the longest prefix of a reference answer (e.g. '4' of '42'): the token
    to track by default. vocab: token texts of the stored lists. Ties (' 4' and '4') go to the text stored
    most often, then the first in sort order, so a report draws the same grid in every process. None when
    nothing matches."""
    if not answer or not str(answer).strip():
        return None
    a = str(answer).strip()
    counts = pd.Series(vocab).value_counts()
    hits = [(len(t.strip()), int(n), t) for t, n in counts.items() if t.strip() and a.startswith(t.strip())]
    return min(hits, key=lambda h: (-h[0], -h[1], h[2]))[2] if hits else None


def build_grid(topk: pd.DataFrame, entropy: pd.DataFrame, toks: pd.DataFrame, model_name: str, lens: str,
               site: str, prompt: int, color: str = "H", token: int | str | None = None, run_id: str = "run"):
    """(grid figure, its data) from one prompt's rows — topk (any superset of the lens/site/prompt), entropy
    rows (layer, position, H_<site>) and tokens (position, token_text, role): what `Run.grid`, the dashboard's
    grid view and the report draw. The data has one row per cell, with the tracked token's rank and prob."""
    from entropylens.analysis.figures import grid_figure

    if site not in SITES or color not in ("H", "p1"):
        raise UserError(f"site is one of {', '.join(SITES)}; colour is 'H' or 'p1'")
    check_topk(topk, run_id)
    cells = grid_cells(topk, lens, site, int(prompt))
    if cells.empty:
        raise UserError(f"run {run_id} has no top-K rows for lens {lens!r}, site {site}, prompt {prompt}")
    cells = with_entropy(cells, entropy, site)
    toks = toks[toks["position"].isin(set(cells["position"]))].sort_values("position").reset_index(drop=True)
    tracked, label = None, ""
    if token is not None and str(token).strip() != "":
        tid, label = resolve_token(token, topk)
        tracked = track(topk, tid, lens, site, int(prompt))
        cells = cells.merge(tracked.rename(columns={"rank": "tracked_rank", "prob": "tracked_prob"}),
                            on=["layer", "position"], how="left")
    fig = grid_figure(cells, toks, model_name, lens, int(prompt), site, color, tracked, label)
    return fig, cells.assign(lens=lens, site=site, prompt_idx=int(prompt))
