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
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host"}
OWN = {"date", "server"}  # uvicorn sets its own
REFUSED = "this address serves only the Fleet API (/v1/fleet/*, /health)\n"


def is_public(path: str) -> bool:
    return path == "/health" or path.startswith("/v1/fleet/")


def make_app(upstream: str, ca: Path | None) -> Starlette:
    """The proxy to `upstream` (host:port of the SuperLink; over TLS trusting `ca`, when given)."""
    client = httpx.AsyncClient(base_url=f"{'https' if ca else 'http'}://{upstream}", verify=str(ca) if ca else False,
                               timeout=httpx.Timeout(None, connect=10.0))

    async def forward(request: Request) -> PlainTextResponse | StreamingResponse:
        if not is_public(request.url.path):
            return PlainTextResponse(REFUSED, status_code=403)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in HOP_BY_HOP]
        sent = client.build_request(request.method, request.url.path, params=request.url.query or None,
                                    headers=headers, content=request.stream())
        try:
            reply = await client.send(sent, stream=True)
        except httpx.HTTPError:
            return PlainTextResponse("the coordinator's SuperLink is not reachable\n", status_code=502)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP | OWN}
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=kept,
                                 background=BackgroundTask(reply.aclose))

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
    uvicorn.run(make_app(args.upstream, keys / "ca.pem" if keys else None), host=host, port=int(port),
                log_level="warning", **tls)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
