"""tistudio's HTTP API and web page. Not imported by the library; `tistudio serve` starts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tistudio.errors import OptionError
from tistudio.server.app import ServerConfig, create_app
from tistudio.server.security import LOOPBACK_HOSTS
from tistudio.server.workspace import Limits

__all__ = ["ServerConfig", "create_app", "read_auth", "serve"]


def read_auth(auth: str, auth_file: str) -> list[tuple[str, str]]:
    """USER:PASS pairs from --auth (comma-separated) and --auth-file (one per line, # comments)."""
    entries = [a for a in (auth or "").split(",") if a.strip()]
    if auth_file:
        path = Path(auth_file).expanduser()
        try:
            lines = path.read_text("utf-8").splitlines()
        except OSError as exc:
            raise OptionError("auth_file", auth_file, f"cannot read it ({exc.strerror})") from None
        entries += [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    pairs = []
    for entry in entries:
        user, sep, password = entry.strip().partition(":")
        if not sep or not user or not password:
            raise OptionError("auth", "USER:***", "write USER:PASSWORD (both non-empty)")
        pairs.append((user, password))
    return pairs


SHUTDOWN_GRACE_S = 5  # the longest a shutdown waits for requests in progress (an upload, a stalled client)


def serve(config: ServerConfig, host: str, port: int) -> None:
    """Run the server until Ctrl-C. --listen (a non-loopback host) needs auth: checked by the caller."""
    from tistudio.server.serving import ShuttingDownServer

    if host not in LOOPBACK_HOSTS and not config.auth:
        raise OptionError(
            "listen", host, "answering other computers needs a password: pass --auth USER:PASS or --auth-file FILE"
        )
    app = create_app(config)
    settings = uvicorn_settings(app, config.limits, host, port, config.trusted_proxies)
    ShuttingDownServer(settings, on_exit=app.state.server.close).run()


def uvicorn_settings(app: Any, limits: Limits, host: str, port: int, trusted_proxies: str = "") -> Any:
    """How `serve` runs uvicorn. limit_concurrency: past this many open connections and requests, new ones get a
    503 at once instead of piling up (a flood of idle sockets); idle keep-alive connections close after 5 s, and
    connections whose request headers are not in within header_seconds are closed (slowloris). Forwarding
    headers are read only from `trusted_proxies` (uvicorn's default believes any from 127.0.0.1, so a local
    process could pose as many clients to the password lockout). A shutdown waits at most SHUTDOWN_GRACE_S for
    the requests in progress (uvicorn's own wait has no end: a client stalled mid-request held Ctrl-C and SIGTERM
    for ever), then cancels them; the running job's stop and save come after, in the app's lifespan."""
    import uvicorn

    from tistudio.server.serving import header_deadline_protocol

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        limit_concurrency=limits.connections,
        timeout_keep_alive=5,
        http=header_deadline_protocol(limits.header_seconds),
        proxy_headers=bool(trusted_proxies),
        forwarded_allow_ips=trusted_proxies or None,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
