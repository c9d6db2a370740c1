"""Who may call: a server interceptor that checks bearer tokens or peer identities.

Every RPC but grpc.health.v1 (probes must reach it; it tells only SERVING or not) is
guarded; reflection and DescribeChain included:

- the public API (coordinator) asks for `authorization: Bearer TOKEN` when a tokens file is
  configured: missing or unknown → UNAUTHENTICATED;
- internal services (stages, decoder) run mTLS, so grpc has already refused any peer
  without a certificate of the pipeline's CA; with `callers` they also admit only the
  SPIFFE IDs of the service before them in the chain → PERMISSION_DENIED otherwise.

The token is never logged nor put in an error: the logs say which stored entry admitted a
call, or why a call was refused. The check wraps the method's own handler (so it runs with
the call's auth context), keeping its kind: coroutine or async generator.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from ditserve.common.logs import log_event

from .tokens import TokenFile

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
"""Methods any peer may call (on an mTLS port, any peer with a certificate of the CA)."""

Denial = tuple[grpc.StatusCode, str]
Check = Callable[[Any, str], Denial | None]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call to a guarded method only if `check(context, method)` finds no fault."""

    def __init__(self, service: str, check: Check):
        self.service, self.check = service, check

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_PREFIXES):
            return handler
        return _guarded(handler, self._gate(details.method))

    def _gate(self, method: str) -> Callable[[Any], Awaitable[None]]:
        async def gate(context: Any) -> None:
            denial = self.check(context, method)
            if denial is not None:
                code, message = denial
                log_event("call_refused", level=30, name=self.service, method=method,
                          peer=context.peer(), code=code.name, reason=message)
                await context.abort(code, message)
        return gate


def _guarded(handler: grpc.RpcMethodHandler, gate: Callable[[Any], Awaitable[None]]
             ) -> grpc.RpcMethodHandler:
    """The same handler with `gate(context)` before its behaviour."""
    for kind, make in (("unary_unary", grpc.unary_unary_rpc_method_handler),
                       ("unary_stream", grpc.unary_stream_rpc_method_handler),
                       ("stream_unary", grpc.stream_unary_rpc_method_handler),
                       ("stream_stream", grpc.stream_stream_rpc_method_handler)):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return make(_wrap(behaviour, gate), request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
    raise TypeError("an RPC method handler without a behaviour")


def _wrap(behaviour: Callable[..., Any], gate: Callable[[Any], Awaitable[None]]
          ) -> Callable[..., Any]:
    # grpc.aio tells streaming handlers apart by kind (async generator or coroutine that
    # writes), so the wrapper keeps the kind of what it wraps.
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request: Any, context: Any) -> Any:
            await gate(context)
            async for response in behaviour(request, context):
                yield response
        return stream
    if not inspect.iscoroutinefunction(behaviour):
        raise TypeError(f"{behaviour!r}: ditserve's servers run async handlers only")

    async def call(request: Any, context: Any) -> Any:
        await gate(context)
        return await behaviour(request, context)
    return call


def bearer_check(tokens: TokenFile) -> Check:
    """UNAUTHENTICATED unless the call carries `authorization: Bearer T` with T admitted."""
    def check(context: Any, method: str) -> Denial | None:
        values = [v for k, v in context.invocation_metadata() or () if k == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, ("missing bearer token (metadata "
                                                     "'authorization: Bearer TOKEN')")
        scheme, _, token = str(values[0]).partition(" ")
        if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
            return grpc.StatusCode.UNAUTHENTICATED, ("malformed authorization metadata: "
                                                     "expected one 'Bearer TOKEN'")
        name = tokens.check(token.strip())
        if name is None:
            return grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token"
        log_event("call_admitted", level=10, method=method, token_name=name)
        return None
    return check


def identity_check(service: str, callers: Sequence[str]) -> Check:
    """PERMISSION_DENIED unless the peer's certificate names one of `callers` (SPIFFE IDs)."""
    allowed = {c.encode() for c in callers}

    def check(context: Any, method: str) -> Denial | None:
        found = (context.auth_context() or {}).get("peer_spiffe_id", [])
        if allowed.intersection(found):
            return None
        named = found[0].decode(errors="replace") if found else "no SPIFFE ID (URI SAN)"
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"{service} accepts calls only from {', '.join(sorted(callers))}; the peer's "
            f"certificate names {named}")
    return check
