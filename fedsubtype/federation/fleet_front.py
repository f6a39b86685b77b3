"""The coordinator's public address: a TLS front that forwards only the Fleet API to the SuperLink on loopback.

Flower 1.42 serves its Control API (run submission, node registration), Fleet API (what a SuperNode needs) and
Runtime API (what the ServerApp and SuperExec use) on one HTTP port, and its open-source build has no login for the
Control API. So the SuperLink listens on 127.0.0.1 only, and sites reach it through this front: it terminates TLS
with the coordinator's server certificate and forwards a request only when it is a POST to one of the Fleet API's
paths, with no query string; everything else is answered 404 and logged, without reaching the SuperLink.

Run by `fedsubtype-server` as ``python -m fedsubtype.federation.fleet_front --listen HOST:PORT --upstream
127.0.0.1:PORT --certfile server.crt --keyfile server.key --upstream-ca ca.crt``.
"""

from __future__ import annotations

import argparse
import logging
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

FLEET_PATHS: frozenset[str] = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"))
"""The Fleet API of Flower 1.42 (flwr.supercore.protobuf.translation); a test checks the two lists agree."""
HOP_BY_HOP: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade"})
DROPPED_REQUEST_HEADERS: frozenset[str] = HOP_BY_HOP | {"host", "content-length", "forwarded", "x-forwarded-for",
                                                        "x-forwarded-proto", "x-forwarded-host", "x-real-ip"}
"""Not passed on: hop-by-hop headers, and what a site could use to pose as another address to the SuperLink."""
MAX_BODY_BYTES = 512 * 1024 * 1024
"""Largest request body forwarded (a SuperNode's largest is one packed weight array)."""
MAX_CONNECTIONS = 256
"""Connections and requests served at once (a SuperNode keeps one or two); beyond it new ones get 503."""
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites offered (forward secrecy, AEAD only); TLS 1.3 suites are OpenSSL's defaults."""

log = logging.getLogger("fedsubtype.fleet_front")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


@dataclass(frozen=True)
class FrontConfig:
    """Where the front listens, the SuperLink it forwards to, and its TLS files (None: plain HTTP, trial only)."""

    host: str
    port: int
    upstream: str
    certfile: Path | None = None
    keyfile: Path | None = None
    upstream_ca: Path | None = None


def is_fleet_request(method: str, path: str, query: bytes) -> bool:
    """The one rule of the front: a POST to a Fleet API path, nothing appended."""
    return method == "POST" and path in FLEET_PATHS and not query


def upstream_tls(ca_file: Path | None) -> ssl.SSLContext | bool:
    """Verification of the loopback SuperLink: its certificate must chain to the CA. Its host name is not checked,
    because the certificate names the public host while the front connects to 127.0.0.1."""
    if ca_file is None:
        return False
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    return ctx


class FleetFront:
    """ASGI app: forward Fleet API requests to the upstream SuperLink, answer everything else 404."""

    def __init__(self, upstream_url: str, verify: ssl.SSLContext | bool) -> None:
        self.upstream_url = upstream_url.rstrip("/")
        self.verify = verify
        self.http = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            if is_fleet_request(scope["method"], scope["path"], scope.get("query_string", b"")):
                await self._forward(scope, receive, send)
            else:
                log.warning("refused %s %r from %s (not the Fleet API)", scope["method"], scope["path"][:200],
                            _peer(scope))
                await _reply(send, 404, b"not found\n")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        import httpx

        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                timeout = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0)
                self.http = httpx.AsyncClient(verify=self.verify, timeout=timeout, follow_redirects=False)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.http is not None:
                    await self.http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        import httpx

        body, complete = await _read_body(receive)
        if not complete:
            await _reply(send, 413, b"request too large\n")
            return
        headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1").lower() not in DROPPED_REQUEST_HEADERS]
        headers.append((b"x-forwarded-for", _peer(scope).encode("latin-1")))  # the SuperLink trusts it from loopback
        request = self.http.build_request("POST", self.upstream_url + scope["path"], headers=headers, content=body)
        try:
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("the SuperLink did not answer %s (%s)", scope["path"], type(exc).__name__)
            await _reply(send, 502, b"the SuperLink is not reachable\n")
            return
        try:
            out = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()


def _peer(scope: Scope) -> str:
    """The connecting site's IP address."""
    return str((scope.get("client") or ("unknown", 0))[0])


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    """(the request body, whether it arrived whole): False when the client left or it exceeds MAX_BODY_BYTES."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", False
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return b"", False
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts), True


async def _reply(send: Send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


def _server_tls(config, default_factory: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:  # noqa: ARG001
    ctx = default_factory()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def serve(cfg: FrontConfig) -> None:
    """Run the front until it is stopped (SIGTERM / Ctrl-C)."""
    import uvicorn

    scheme = "https" if cfg.upstream_ca is not None else "http"
    app = FleetFront(f"{scheme}://{cfg.upstream}", upstream_tls(cfg.upstream_ca))
    tls = {} if cfg.certfile is None else {
        "ssl_certfile": str(cfg.certfile), "ssl_keyfile": str(cfg.keyfile), "ssl_ciphers": TLS_CIPHERS,
        "ssl_context_factory": _server_tls}
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, http="h11", ws="none", lifespan="on",
                            access_log=False, log_level="warning", server_header=False, proxy_headers=False,
                            limit_concurrency=MAX_CONNECTIONS, **tls)
    print(f"fleet front on {cfg.host}:{cfg.port} ({'TLS' if cfg.certfile else 'plain HTTP'}), forwarding "
          f"only {len(FLEET_PATHS)} Fleet API paths to {cfg.upstream}", flush=True)
    uvicorn.Server(config).run()


def front_args(cfg: FrontConfig) -> list[str]:
    """Command line that starts the front as a child process with this interpreter."""
    args = [sys.executable, "-m", "fedsubtype.federation.fleet_front", "--listen", f"{cfg.host}:{cfg.port}",
            "--upstream", cfg.upstream]
    if cfg.certfile is None:
        return [*args, "--insecure"]
    return [*args, "--certfile", str(cfg.certfile), "--keyfile", str(cfg.keyfile), "--upstream-ca",
            str(cfg.upstream_ca)]


def parse_args(argv: Sequence[str] | None = None) -> FrontConfig:
    """The front's command line, checked (TLS files present and the key private) before anything listens."""
    from fedsubtype.errors import UserError
    from fedsubtype.federation.credentials import check_certificate_file, check_private_file_mode
    from fedsubtype.federation.processes import split_address

    p = argparse.ArgumentParser(prog="python -m fedsubtype.federation.fleet_front",
                                description="Forward only Flower's Fleet API from a public TLS address to a SuperLink "
                                            "on loopback.")
    p.add_argument("--listen", required=True, help="HOST:PORT the sites connect to")
    p.add_argument("--upstream", required=True, help="the SuperLink's loopback HOST:PORT")
    p.add_argument("--certfile", type=Path, help="TLS certificate of the public address")
    p.add_argument("--keyfile", type=Path, help="its private key (mode 0600)")
    p.add_argument("--upstream-ca", type=Path, help="CA certificate that signed the SuperLink's certificate")
    p.add_argument("--insecure", action="store_true", help="plain HTTP both ways (a trial on one machine only)")
    a = p.parse_args(argv)
    host, port = split_address(a.listen)
    if a.insecure:
        return FrontConfig(host, port, a.upstream)
    if a.certfile is None or a.keyfile is None or a.upstream_ca is None:
        raise UserError("TLS files missing", "pass --certfile, --keyfile and --upstream-ca (or --insecure)",
                        where="fleet front")
    check_certificate_file(a.certfile, where="fleet front: --certfile")
    check_certificate_file(a.upstream_ca, where="fleet front: --upstream-ca")
    check_private_file_mode(a.keyfile, where="fleet front: --keyfile")
    return FrontConfig(host, port, a.upstream, a.certfile, a.keyfile, a.upstream_ca)


def main(argv: Sequence[str] | None = None) -> int:
    from fedsubtype.cli import run_guarded

    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet-front %(levelname)s %(message)s")
    return run_guarded("fleet front", lambda: serve(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
