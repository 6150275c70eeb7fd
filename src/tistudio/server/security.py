"""Safe by default: the checks every request passes before it reaches the API.

* **Host** - unless the server was started with ``--listen``, the Host header must name the loopback address
  (127.0.0.1, localhost, [::1]); a web page that rebinds its own domain name to 127.0.0.1 (DNS rebinding) is
  refused.
* **Origin** - a request that changes something (POST, PUT, PATCH, DELETE) sent by a browser from another site
  (its Origin is not this server, or Sec-Fetch-Site says cross-site) is refused, so no page the user visits can
  drive the local server (CSRF). There is no CORS header at all, wildcard or otherwise.
* **Auth** - with ``--auth`` or ``--auth-file``, every request needs HTTP Basic credentials (compared in constant
  time). ``--listen`` refuses to start without them (see cli.py). A client address that gives wrong ones
  ``AUTH_FAILURES`` times within ``AUTH_WINDOW_S`` is answered 429 until the window has passed, and so is a user
  name that many wrong passwords were tried for, from any addresses (rotating 127.0.1.x gave 2,250 guesses a
  second), so a password cannot be guessed at network speed. The address is the connection's own: forwarding
  headers are trusted only from the proxies named with ``--trusted-proxy``.
* **Size** - a request body larger than the server's cap is refused: before it is read where it states its
  length, and as soon as it passes the cap where it does not (chunked).
* **Framing** - no other site may show the page in a frame (X-Frame-Options, CSP frame-ancestors) to trick clicks;
  responses are never sniffed as another type and send no Referer.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
import time
from collections import deque
from typing import Any

from tistudio.storage import size_text

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
AUTH_FAILURES = 10  # wrong passwords from one address ...
AUTH_WINDOW_S = 60.0  # ... within this many seconds, then 429 until the oldest is this old
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
RESPONSE_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


HOST_HEADER = re.compile(r"\A(\[[0-9A-Fa-f:.]+\]|[^:\[\]@/\s]+)(?::\d{1,5})?\Z")


def _host_name(host: str) -> str:
    """The name a Host header gives, without its port; "" where the header is not a plain name[:port] (a loopback
    name followed by anything else - "[::1]x", "[::1]:abc" - is not this computer either)."""
    if host == "::1":
        return host
    found = HOST_HEADER.match(host)
    return found.group(1) if found else ""


class SecurityMiddleware:
    def __init__(
        self, app: Any, auth: list[tuple[str, str]], listening: bool, max_body: int, max_json: int | None = None
    ) -> None:
        self.app = app
        self.auth = auth
        self.listening = listening
        self.max_body = max_body
        self.max_json = max_body if max_json is None else min(max_json, max_body)
        self.failures: dict[str, deque[float]] = {}  # by client address: when its wrong passwords came

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.listening and _host_name(host).lower() not in LOOPBACK_HOSTS:
            await self._refuse(
                send,
                403,
                f"Host {host!r} is not this computer; tistudio only answers requests "
                "for 127.0.0.1 or localhost unless started with --listen",
            )
            return
        method = scope.get("method", "GET")
        if method in UNSAFE_METHODS:
            origin = headers.get("origin")
            if headers.get("sec-fetch-site", "").lower() == "cross-site" or (
                origin is not None and origin != "null" and origin.split("://", 1)[-1] != host
            ):
                await self._refuse(
                    send, 403, "cross-site request refused: only tistudio's own page may change things on this server"
                )
                return
            if origin == "null":
                await self._refuse(send, 403, "requests from sandboxed or file:// pages are refused")
                return
        if self.auth:
            header = headers.get("authorization", "")
            client, user = (scope.get("client") or ("?",))[0], "user:" + _user_of(header)
            wait = max(self._locked_out(client), self._locked_out(user) if header else 0)
            page = "text/html" in headers.get("accept", "")  # a browser loading the page, not the page's API calls
            if wait:
                await self._refuse(
                    send,
                    429,
                    f"too many wrong passwords; try again in {wait} s",
                    [(b"retry-after", str(wait).encode())],
                    page=page,
                )
                return
            if not self._authorised(header):
                if header:  # a browser's first request carries none: only a wrong password counts
                    self._failed(client)
                    self._failed(user)
                await self._refuse(
                    send,
                    401,
                    "sign in: this server needs a user name and password",
                    [(b"www-authenticate", b'Basic realm="tistudio", charset="UTF-8"')],
                    page=page,
                )
                return
        send = _with_headers(send)
        # files come as multipart forms; anything else (JSON: parsed whole, it takes several times its size) is small
        form = headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"
        cap = self.max_body if form else self.max_json
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            await self._refuse(send, 413, self._too_large(cap))
            return
        await self.app(scope, *self._capped(receive, send, cap))

    def _too_large(self, cap: int) -> str:
        return f"the request is larger than {size_text(cap)}, the most this server accepts for it"

    def _capped(self, receive: Any, send: Any, cap: int) -> tuple[Any, Any]:
        """receive and send for the app that count the body as it arrives (a chunked request states no length):
        past the cap the client gets a 413, the app sees the client gone, and what it would answer is dropped."""
        state = {"read": 0, "refused": False, "started": False}

        async def capped_receive() -> dict[str, Any]:
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > cap:
                    state["refused"] = True
                    if not state["started"]:
                        await self._refuse(send, 413, self._too_large(cap))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["refused"]:
                return
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        return capped_receive, guarded_send

    def _failed(self, client: str) -> None:
        """A wrong password from a client address, or for a user name ("user:NAME")."""
        now = time.monotonic()
        if len(self.failures) > 10_000:  # many addresses: forget those whose last failure is out of the window
            self.failures = {c: t for c, t in self.failures.items() if now - t[-1] < AUTH_WINDOW_S}
        self.failures.setdefault(client, deque(maxlen=AUTH_FAILURES)).append(now)

    def _locked_out(self, client: str) -> int:
        """Seconds until `client` may try a password again (0: now)."""
        times = self.failures.get(client)
        if not times or len(times) < AUTH_FAILURES:
            return 0
        left = AUTH_WINDOW_S - (time.monotonic() - times[0])
        if left <= 0:
            del self.failures[client]
            return 0
        return max(1, math.ceil(left))

    def _authorised(self, header: str) -> bool:
        if not header.lower().startswith("basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return False
        matched = False
        for known_user, known_password in self.auth:
            ok_user = hmac.compare_digest(user.encode(), known_user.encode())
            ok_password = hmac.compare_digest(password.encode(), known_password.encode())
            matched |= ok_user and ok_password
        return matched

    @staticmethod
    async def _refuse(
        send: Any, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None, page: bool = False
    ) -> None:
        """The refusal as JSON ({"error": ...}) for API clients, or as a short page for a browser loading the page
        (after the sign-in prompt is cancelled, or while a client is locked out) instead of raw JSON."""
        if page:
            body, kind = refusal_page(status, message).encode(), b"text/html; charset=utf-8"
        else:
            body, kind = json.dumps({"error": message}).encode(), b"application/json"
        headers = [(b"content-type", kind), (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def refusal_page(status: int, message: str) -> str:
    """The page a browser shows when it is refused: what happened and what to do, in words."""
    from html import escape

    title = "Sign-in needed" if status == 401 else "Too many wrong passwords"
    todo = (
        "Reload the page and sign in with the user name and password this server was started with."
        if status == 401
        else "Wait, then reload the page and sign in again."
    )
    return (
        f"<!doctype html><meta charset='utf-8'><title>tistudio: {title}</title>"
        "<body style='font:16px system-ui,sans-serif;max-width:36em;margin:3em auto;padding:0 1em'>"
        f"<h1>{title}</h1><p>This tistudio server says: {escape(message)}.</p><p>{todo}</p></body>"
    )


def _with_headers(send: Any) -> Any:
    async def send_with_headers(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), *RESPONSE_HEADERS]}
        await send(message)

    return send_with_headers


def _user_of(header: str) -> str:
    """The user name Basic credentials give ("" where they are not readable), at most 64 characters of it."""
    if not header.lower().startswith("basic "):
        return ""
    try:
        return base64.b64decode(header[6:].strip()[:4096], validate=True).decode("utf-8").partition(":")[0][:64]
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return ""
