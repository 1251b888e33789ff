"""Options declared once on a dataclass: typer sees the fields, the command gets the config back."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import typer
from typer.testing import CliRunner

from entropylens.tracing.bench import BenchConfig
from entropylens.bupo.config import BupoRunConfig
from entropylens.cli.commands import app as cli_app
from entropylens.tracing.config import TraceConfig
from entropylens.errors import UserError
from entropylens.analysis.report import ReportConfig
from entropylens.options import build, cli_options, flatten, option, parse_csv, parse_limit


@dataclass
class Inner:
    lr: float = option(0.5, "learning rate", flags=("--lr", "-l"))
    hidden: int = option(3, "not on the command line", cli=False)


@dataclass
class Outer:
    name: str = option("x", "a name")
    limit: int | None = option(8, "first N, or 'all'", parse=parse_limit)
    sites: tuple[str, ...] = option(("a", "b"), "comma-separated", parse=parse_csv, shown="a,b")
    verbose: bool = option(False, "talk more")
    inner: Inner = field(default_factory=lambda: Inner(lr=0.25, hidden=7))  # embedded with its own defaults


def _app(seen: list) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @cli_options(Outer)
    def run(options: dict, quiet: bool = typer.Option(False, help="own option")) -> None:
        seen.append((build(Outer, options), quiet))

    return app


def test_fields_become_options_and_come_back_as_the_config():
    seen: list = []
    r = CliRunner().invoke(_app(seen), ["--limit", "all", "--sites", "c, d", "--verbose", "-l", "0.1", "--quiet"])
    assert r.exit_code == 0, r.output
    cfg, quiet = seen[0]
    assert cfg == Outer(name="x", limit=None, sites=("c", "d"), verbose=True, inner=Inner(lr=0.1, hidden=7)) and quiet
    assert build(Outer, flatten(cfg)) == cfg and flatten(cfg) == dict(name="x", limit=None, sites=("c", "d"),
                                                                     verbose=True, lr=0.1)


def test_defaults_and_help_are_the_fields():
    seen: list = []
    r = CliRunner().invoke(_app(seen), [])
    assert r.exit_code == 0 and seen[0] == (Outer(), False)
    text = CliRunner().invoke(_app([]), ["--help"], env={"COLUMNS": "200"}).output
    for flag, help_ in (("--name", "a name"), ("--limit", "first N, or 'all'"), ("--sites", "comma-separated"),
                        ("--verbose", "talk more"), ("--lr", "learning rate"), ("--quiet", "own option")):
        assert flag in text and help_ in text, flag
    assert "--hidden" not in text and "[default: a,b]" in text and "[default: 8]" in text
    assert "[default: 0.25]" in text  # the embedding config's default, not Inner's own 0.5


@pytest.mark.parametrize("name,config", [("trace", TraceConfig), ("bupo", BupoRunConfig), ("bench", BenchConfig),
                                         ("report", ReportConfig)])
def test_each_command_offers_its_config_fields_and_nothing_else(name, config):
    """A command's options are exactly its config's command-line fields (+ --resume, --quiet)."""
    command = typer.main.get_command(cli_app).commands[name]
    names = {p.name for p in command.params}
    assert names - {"resume", "quiet", "runs"} == set(flatten(config()))


def test_parsers_fail_in_one_line():
    with pytest.raises(UserError, match="positive integer or 'all'"):
        parse_limit("many")
    with pytest.raises(UserError, match="positive integer"):
        parse_limit("0")
    assert parse_csv(" a, ,b ") == ("a", "b")


def test_a_parameter_shadowing_a_field_is_refused():
    with pytest.raises(TypeError, match="shadow"):
        @cli_options(Outer)
        def bad(options: dict, name: str = "y") -> None: ...
