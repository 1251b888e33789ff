"""The config of `entropylens report`: the command's options, light enough for its help (no plotly)."""

from __future__ import annotations

from dataclasses import dataclass

from entropylens.options import option
from entropylens.store.cache import RUNS_HELP, Cache

IMAGE_FORMATS = ("png", "svg")


def _image_formats(text: str) -> tuple[str, ...]:
    """`--images png,svg` or `none`."""
    return () if text == "none" else tuple(f.strip() for f in text.split(",") if f.strip())


@dataclass
class ReportConfig:
    """What `entropylens report` gathers and where it writes."""

    runs: list[str] = option([], "run ids under CACHE/runs (one or more)", cli=False)  # the command's arguments
    out: str = option("report", "output folder (index.html, README.md, figures/, tables/)", flags=("-o", "--out"))
    cache: str = option("cache", "folder holding runs/ (unless --runs)")
    runs_dir: str | None = option(None, RUNS_HELP, flags=("--runs",))
    role: str = option("response", "response | prompt | all tokens")
    band: float = option(0.05, "nats: |mean ΔH| <= band reads as integration")
    collapse_frac: float = option(0.10, "layer-policy collapse threshold as a fraction of log V")
    images: tuple[str, ...] = option(IMAGE_FORMATS, "static image formats (png, svg), or 'none'",
                                     parse=_image_formats, shown=",".join(IMAGE_FORMATS))
    write_stages: bool = option(True, "also write stages.json into each run folder (the dashboard reads it)")
    title: str = option("entropylens report", "report heading")
    notes: str | None = option(None, "Markdown file included as the discussion")
    command: str | None = option(None, "the command line printed as 'regenerate with'", cli=False)

    def folders(self) -> Cache:
        """Where the runs are read."""
        return Cache(self.cache, runs=self.runs_dir)
