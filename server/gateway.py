"""The sites' door to the SuperLink: only Flower's Fleet API, on the federation's address.

Flower 1.42's SuperLink serves every API on one HTTP port: the Fleet API (what SuperNodes
use), the Control API (``flwr run``, ``flwr stop``, ``flwr supernode register/unregister``,
``flwr ls``) and the ServerApp's Runtime API. The Control API has no account
authentication without Flower's enterprise plugins, so whoever reaches that port, for
example any hospital holding the public ``ca.crt``, could register its own key, revoke a
hospital or stop the run. So ``rwft-server`` runs the SuperLink on a loopback port of the
coordinator's machine only, and this gateway on ``federation.address``: it terminates TLS
with the federation's server certificate and forwards requests under ``/v1/fleet/`` to the
SuperLink, unchanged (headers included, so Flower's SuperNode authentication still checks
every signature). Any other path is answered ``404`` without reaching the SuperLink.

``python -m rwft.server.gateway --listen HOST:PORT --upstream URL [--certfile F --keyfile F
--upstream-ca F]``; ``rwft.server.superlink.start_superlink`` starts it.
"""

from __future__ import annotations

import argparse
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

FLEET_PREFIX = "/v1/fleet/"
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the forwarding HTTP stack sets itself.
_NOT_FORWARDED = frozenset({"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
                            "transfer-encoding", "upgrade", "content-length"})
REFUSED = ("rwft gateway: only the Fleet API (SuperNodes) is served on this address; the federation is "
           "controlled from the coordinator's machine only.\n")


def create_gateway(upstream: str, upstream_ca: str | None = None) -> Starlette:
    """An ASGI app forwarding ``/v1/fleet/*`` to the SuperLink at ``upstream`` and refusing the rest."""
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=upstream_ca) if upstream_ca else False
    client = httpx.AsyncClient(base_url=upstream, verify=verify, timeout=None,
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def forward(request: Request) -> Response:
        if not request.url.path.startswith(FLEET_PREFIX):
            return PlainTextResponse(REFUSED, status_code=404)
        headers = [(name, value) for name, value in request.headers.raw
                   if name.decode("latin-1").lower() not in _NOT_FORWARDED]
        outgoing = client.build_request(request.method, request.url.path, params=request.query_params,
                                        headers=headers, content=await request.body())
        answer = await client.send(outgoing, stream=True)
        try:
            body = b"".join([chunk async for chunk in answer.aiter_raw()])  # as sent: encoding kept
        finally:
            await answer.aclose()
        kept = {name: value for name, value in answer.headers.items() if name.lower() not in _NOT_FORWARDED}
        return Response(body, status_code=answer.status_code, headers=kept)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m rwft.server.gateway", description=__doc__.split("\n")[0])
    parser.add_argument("--listen", required=True, metavar="HOST:PORT")
    parser.add_argument("--upstream", required=True, metavar="URL", help="the SuperLink, e.g. https://127.0.0.1:P")
    parser.add_argument("--certfile", help="the federation's server certificate (TLS for the sites)")
    parser.add_argument("--keyfile", help="its private key")
    parser.add_argument("--upstream-ca", help="the CA that signed the SuperLink's certificate")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(create_gateway(args.upstream, args.upstream_ca), host=host.strip("[]"), port=int(port),
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, access_log=False, log_level="warning",
                workers=1)


if __name__ == "__main__":
    main()
