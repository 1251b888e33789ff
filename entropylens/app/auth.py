"""A shared token in front of every route of the dashboard, for serving it beyond localhost.

What it protects (docs/reliability.md, threat model): without the token nobody who can reach the port
gets a page, a callback answer, an asset or a run listing: every request answers 401 with a login form.
The token is taken from the login form (POST) or a first link `?token=...` (GET), compared in constant
time, and answered with a cookie holding a keyed hash of it (never the token itself), HttpOnly and
SameSite=Strict; the URL is redirected without the token so it does not stay in the address bar, history
or a reverse proxy's later requests. Headers other than that cookie are not read. TLS is the reverse
proxy's job: over plain HTTP the token and cookie cross the network in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import logging
import re
from urllib.parse import urlencode

from flask import Flask, Response, redirect, request

COOKIE = "entropylens_session"
LOGIN_PATH = "/_entropylens/login"
MIN_LENGTH = 8
_TOKEN_QUERY = re.compile(r"(token=)[^&\s\"']*")

_FORM = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>entropylens · sign in</title></head>
<body style="font-family: sans-serif; margin: 4em auto; max-width: 28em">
<h1>entropylens</h1><p>{message}</p>
<form method="post" action="{action}"><input type="hidden" name="next" value="{next}">
<label>token <input type="password" name="token" autofocus autocomplete="current-password"></label>
<button type="submit">open the dashboard</button></form></body></html>"""


def check_token(token: str) -> None:
    """Refuse a token too short to guess-proof the port (ValueError with the reason)."""
    if len(token) < MIN_LENGTH or token.strip() != token:
        raise ValueError(f"the token must be at least {MIN_LENGTH} characters without surrounding spaces")


def session_value(token: str) -> str:
    """The cookie's value: a keyed hash of the token, the same in every worker, useless as a token itself."""
    return hmac.new(token.encode(), b"entropylens dashboard session", hashlib.sha256).hexdigest()


def _same(a: str, b: str) -> bool:
    # Hash both first: compare_digest then compares equal-length strings, so neither the content nor the
    # length of a guess changes the time taken.
    return hmac.compare_digest(hashlib.sha256(a.encode()).digest(), hashlib.sha256(b.encode()).digest())


def _safe_next(target: str | None) -> str:
    """Only a path on this server (no scheme, no host, no `//`): the login form cannot redirect elsewhere."""
    target = target or "/"
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _form(message: str, next_path: str, status: int) -> Response:
    page = _FORM.format(message=html.escape(message), action=LOGIN_PATH, next=html.escape(_safe_next(next_path)))
    return Response(page, status=status, mimetype="text/html",
                    headers={"Cache-Control": "no-store", "WWW-Authenticate": 'Cookie realm="entropylens"'})


def _without_token() -> str:
    rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
    return request.path + (f"?{urlencode(rest)}" if rest else "")


class RedactToken(logging.Filter):
    """Blank `token=...` in log records (the development server logs every request line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "token=" in msg:
            record.msg, record.args = _TOKEN_QUERY.sub(r"\1[redacted]", msg), ()
        return True


def protect(server: Flask, token: str) -> None:
    """Require `token` on every request to `server` (a Dash app's Flask server)."""
    check_token(token)
    cookie = session_value(token)
    logging.getLogger("werkzeug").addFilter(RedactToken())

    def set_cookie(resp: Response) -> Response:
        resp.set_cookie(COOKIE, cookie, httponly=True, samesite="Strict", path="/")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @server.before_request
    def _require_token():
        if request.path == LOGIN_PATH and request.method == "POST":
            if _same(request.form.get("token", ""), token):
                return set_cookie(redirect(_safe_next(request.form.get("next")), code=303))
            return _form("Wrong token.", request.form.get("next", "/"), 401)
        if _same(request.cookies.get(COOKIE, ""), cookie):
            return None
        if request.method in ("GET", "HEAD") and "token" in request.args:
            if _same(request.args.get("token", ""), token):
                return set_cookie(redirect(_without_token(), code=303))
            return _form("Wrong token.", _without_token(), 401)
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            return _form("This dashboard needs the token it was started with.", _without_token(), 401)
        return Response("401 unauthorized: open the dashboard's page and enter the token\n", status=401,
                        mimetype="text/plain", headers={"Cache-Control": "no-store"})
