"""The public face of the coordinator: a TLS reverse proxy that serves only Flower's Fleet API.

In open-source Flower 1.42 the Control API (start runs, register sites) has no authentication and shares
the SuperLink's port with the Fleet API the sites use, so whoever reaches that port could run code on the
server and on every site. `echocare-server` therefore keeps the SuperLink on 127.0.0.1 and starts this
proxy on the public address: `/v1/fleet/*` and `/health` are forwarded (bodies streamed, headers kept, so
the sites' request signatures pass), everything else is answered 403.

    python -m echocare_server.proxy --listen HOST:PORT --upstream 127.0.0.1:PORT [--keys FOLDER]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
}
OWN = {"date", "server"}  # uvicorn sets its own
REFUSED = "this address serves only the Fleet API (/v1/fleet/*, /health)\n"
# letters, digits, '-' and '_' between slashes: no dot segments, escapes or empty segments, so the path that
# is checked is the path the SuperLink gets (a decoded or normalised path could be walked out of /v1/fleet/)
PUBLIC = re.compile(r"/health|/v1/fleet(/[A-Za-z0-9_-]+)+")


def make_app(upstream: str, ca: Path | None) -> Starlette:
    """The proxy to `upstream` (host:port of the SuperLink; over TLS trusting `ca`, when given)."""
    client = httpx.AsyncClient(
        base_url=f"{'https' if ca else 'http'}://{upstream}",
        verify=str(ca) if ca else False,
        timeout=httpx.Timeout(300.0, connect=10.0, pool=60.0),  # per read/write, not total
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
    )

    async def forward(request: Request) -> PlainTextResponse | StreamingResponse:
        path = request.scope.get("raw_path", b"").split(b"?", 1)[0].decode("latin-1")  # as received, undecoded
        if not PUBLIC.fullmatch(path):
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        query = request.scope.get("query_string", b"")
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        sent = client.build_request(
            request.method,
            httpx.URL(path=path, **({"query": query} if query else {})),
            headers=headers,
            content=request.stream() if has_body else None,
        )
        try:
            reply = await client.send(sent, stream=True)
        except httpx.HTTPError:
            return PlainTextResponse("the coordinator's SuperLink is not reachable\n", status_code=502)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            finally:
                await reply.aclose()

        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP | OWN}
        return StreamingResponse(body(), status_code=reply.status_code, headers=kept)

    @asynccontextmanager
    async def lifespan(_app: Starlette):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echocare_server.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="public HOST:PORT")
    parser.add_argument("--upstream", required=True, help="the SuperLink's 127.0.0.1:PORT")
    parser.add_argument("--keys", help="echocare-keys folder (ca.pem, server.pem, server.key); omit for plain HTTP")
    args = parser.parse_args(argv)
    host, port = args.listen.rsplit(":", 1)
    keys = Path(args.keys) if args.keys else None
    tls = {"ssl_certfile": str(keys / "server.pem"), "ssl_keyfile": str(keys / "server.key")} if keys else {}
    uvicorn.run(
        make_app(args.upstream, keys / "ca.pem" if keys else None),
        host=host,
        port=int(port),
        log_level="warning",
        **tls,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
