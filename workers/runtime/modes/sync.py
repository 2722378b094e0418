"""``sync``: the handler runs inline in the worker, one request at a time."""

from __future__ import annotations

from workers.runtime.accept import AcceptLoop, close_all, in_lane
from workers.runtime.context import Context, make_server
from workers.runtime.mode import Binding, Mode
from workers.servers import BaseServer


def serve(bindings: list[Binding], context: Context) -> None:
    """Handle each request inline; on TERM, finish it, then serve what is already queued."""
    servers = [
        make_server(endpoint, handler, context, n) for n, (endpoint, handler) in enumerate(bindings)
    ]
    loop = AcceptLoop(servers, context)
    slot = context.slot

    def run(server: BaseServer, request: object, client: object) -> None:
        context.counted()
        in_lane(slot, 0, server, request, client)

    context.ready()
    try:
        while (taken := loop.next()) is not None:
            run(*taken)
        # Recycled, a worker leaves the queue to the others; what it parked is its own.
        loop.drain(context.spec.graceful_timeout, run, queue=context.draining())
    finally:
        loop.close()
        close_all(servers)


MODE = Mode(
    name="sync",
    summary="handle each request inline, one at a time (the default)",
    serve=serve,
    lanes=lambda sizes: 1,
)
