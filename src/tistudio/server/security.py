"""Safe by default: the checks every request passes before it reaches the API.

* **Host** - unless the server was started with ``--listen``, the Host header must name the loopback address
  (127.0.0.1, localhost, [::1]); a web page that rebinds its own domain name to 127.0.0.1 (DNS rebinding) is
  refused.
* **Origin** - a request that changes something (POST, PUT, PATCH, DELETE) sent by a browser from another site
  (its Origin is not this server, or Sec-Fetch-Site says cross-site) is refused, so no page the user visits can
  drive the local server (CSRF). There is no CORS header at all, wildcard or otherwise.
* **Auth** - with ``--auth`` or ``--auth-file``, every request needs HTTP Basic credentials (compared in constant
  time). ``--listen`` refuses to start without them (see cli.py).
* **Size** - a request body larger than the server's cap is refused before it is read.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Any

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host.split("]")[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class SecurityMiddleware:
    def __init__(self, app: Any, auth: list[tuple[str, str]], listening: bool, max_body: int) -> None:
        self.app = app
        self.auth = auth
        self.listening = listening
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.listening and _host_name(host).lower() not in LOOPBACK_HOSTS:
            await self._refuse(send, 403, f"Host {host!r} is not this computer; tistudio only answers requests "
                                          "for 127.0.0.1 or localhost unless started with --listen")
            return
        method = scope.get("method", "GET")
        if method in UNSAFE_METHODS:
            origin = headers.get("origin")
            if headers.get("sec-fetch-site") == "cross-site" or (
                    origin is not None and origin != "null" and origin.split("://", 1)[-1] != host):
                await self._refuse(send, 403, "cross-site request refused: only tistudio's own page may change "
                                              "things on this server")
                return
            if origin == "null":
                await self._refuse(send, 403, "requests from sandboxed or file:// pages are refused")
                return
        if self.auth and not self._authorised(headers.get("authorization", "")):
            await self._refuse(send, 401, "sign in: this server needs a user name and password",
                               [(b"www-authenticate", b'Basic realm="tistudio", charset="UTF-8"')])
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await self._refuse(send, 413, f"the request is larger than {self.max_body // (1024 * 1024)} MB, the "
                                          "most this server accepts")
            return
        await self.app(scope, receive, send)

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
    async def _refuse(send: Any, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
