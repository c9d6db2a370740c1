"""ChainError ↔ gRPC status, with rich details (google.rpc.Status via grpcio-status).

Every failure carries a canonical code (DESIGN §5). A call-level failure is raised as
`context.abort_with_status(to_grpc_status(err))`; a microbatch failure travels in-stream
as `status_proto(err)` in ForwardResponse.error. Both carry an ErrorInfo detail
(domain "ditserve.dit.v1", reason = code name) and, for UNAVAILABLE, a RetryInfo.
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ditserve.chain.base import ChainError, ErrorCode

ERROR_DOMAIN = "ditserve.dit.v1"
RETRY_DELAY_SECONDS = 0.2


def status_proto(error: ChainError) -> status_pb2.Status:
    """The google.rpc.Status of a ChainError, with ErrorInfo (and RetryInfo if retryable)."""
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code.value), message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.code.value, domain=ERROR_DOMAIN)
    status.details.add().Pack(info)
    if error.retryable:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(RETRY_DELAY_SECONDS * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def to_grpc_status(error: ChainError) -> grpc.Status:
    """For `await context.abort_with_status(to_grpc_status(error))`."""
    return rpc_status.to_status(status_proto(error))


def chain_error_from_status(status: status_pb2.Status) -> ChainError:
    """An in-stream google.rpc.Status → ChainError (unknown codes become INTERNAL)."""
    name = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else ""
    code = ErrorCode.__members__.get(name, ErrorCode.INTERNAL)
    return ChainError(code, status.message)


def chain_error_from_rpc(error: grpc.RpcError) -> ChainError:
    """A failed call (grpc.aio.AioRpcError) → ChainError with the same code."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return ChainError(ErrorCode.__members__.get(code.name, ErrorCode.INTERNAL), details or "")
