"""The dashboard ships in a non-editable install: wheel -> fresh folder -> app with its assets, from any cwd."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_serves_app_and_assets(tmp_path, cache):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(wheels)], check=True, capture_output=True)
    wheel = next(wheels.glob("entropylens-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = textwrap.dedent(f"""
        import importlib.util
        from entropylens import app
        assert app.__file__.startswith({str(target)!r}), app.__file__
        assert importlib.util.find_spec("app") is None  # no top-level package named `app` in users' environments
        from entropylens.app.server import create_app
        client = create_app(__import__("pathlib").Path({str(cache)!r})).server.test_client()
        assert client.get("/").status_code == 200
        css = client.get("/assets/style.css")
        assert css.status_code == 200 and len(css.data) > 100, css.status_code
        print("ok")
    """)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
