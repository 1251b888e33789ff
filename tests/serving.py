"""The production server (`entropylens app`, gunicorn) in a real process for tests, and a raw HTTP client.

The client speaks http.client directly so request paths reach the server byte for byte (requests/urllib3
would normalise `..` and percent-escapes away before sending)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reply:
    """What a test reads of a response (the Flask test client's names)."""

    def __init__(self, status: int, headers: dict[str, str], data: bytes):
        self.status_code, self.headers, self.data = status, headers, data

    def get_json(self):
        return json.loads(self.data)


class HttpClient:
    """GET / POST against a served dashboard, with an optional cookie header; paths sent verbatim."""

    def __init__(self, port: int, cookie: str | None = None):
        self.port, self.cookie = port, cookie

    def open(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        hdrs = dict(headers or {})
        if self.cookie and "Cookie" not in hdrs:
            hdrs["Cookie"] = self.cookie
        try:
            conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def get(self, path: str, headers: dict | None = None) -> Reply:
        return self.open("GET", path, headers=headers)

    def post(self, path: str, json: object = None, data: bytes | None = None, headers: dict | None = None) -> Reply:
        import json as _json

        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return self.open("POST", path, _json.dumps(json).encode() if json is not None else data, hdrs)


class Served:
    """`entropylens app --cache CACHE ...` on a free loopback port until `stop()`; its output is kept."""

    def __init__(self, cache: Path, *args: str, env: dict | None = None, log: Path | None = None):
        self.port = free_port()
        self.log = log or Path(cache).parent / f"served-{self.port}.log"
        environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   **(env or {})}
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "entropylens", "app", "--cache", str(cache),
                                      "--port", str(self.port), *args], env=environ, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        end = time.time() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.time() > end:
                    self.stop()
                    raise RuntimeError("server did not start in 120 s") from None
                time.sleep(0.2)

    def client(self, cookie: str | None = None) -> HttpClient:
        return HttpClient(self.port, cookie)

    def stop(self) -> str:
        """Stop the server and its children (SIGTERM to its own process group: gunicorn's graceful stop, and
        the --dev reloader's child) and return everything it logged."""
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # a reloader child that outlived its parent
        except ProcessLookupError:
            pass
        self._out.close()
        return self.log.read_text()


def dash_call(client, output: str, inputs, state=()) -> dict:
    """POST one callback to a Dash test client, as the browser would; the response must be a 200.

    `output` is "id.prop", or several joined by spaces for a multi-output callback."""
    outs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in output.split()]
    name = f"..{'...'.join(output.split())}.." if len(outs) > 1 else output
    body = {"output": name, "outputs": outs if len(outs) > 1 else outs[0],
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "state": [{"id": i, "property": p, "value": v} for i, p, v in state], "changedPropIds": []}
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, r.data[:500]
    return r.get_json()["response"]


FLOW_IN = [("flow-lens", "value", "bupo"), ("flow-role", "value", "response"), ("flow-spread", "value", "std"),
           ("flow-sites", "value", ["layer"]), ("outcome", "value", "all")]


def flow_figure(client, run_id: str) -> dict:
    return dash_call(client, "flow-graph.figure", [("focus-run", "value", run_id)] + FLOW_IN)["flow-graph"]["figure"]
