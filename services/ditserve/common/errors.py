"""ServiceError ↔ gRPC status, with rich details (google.rpc.Status via grpcio-status).

Every failure carries a canonical code (docs/ARCHITECTURE.md §5). A call-level failure is raised as
`context.abort_with_status(to_grpc_status(err))`; a microbatch failure travels in-stream
as `status_proto(err)` in ForwardResponse.error. Both carry an ErrorInfo detail
(domain "ditserve.dit.v1", reason = code name) and, for UNAVAILABLE or an error that
names its `retry_after`, a RetryInfo.
"""

from __future__ import annotations

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ditserve.common.status import ServiceError, StatusCode

ERROR_DOMAIN = "ditserve.dit.v1"
RETRY_DELAY_SECONDS = 0.2


def status_proto(error: ServiceError) -> status_pb2.Status:
    """The google.rpc.Status of a ServiceError, with ErrorInfo (and RetryInfo when it is
    retryable or says when to retry)."""
    status = status_pb2.Status(code=code_pb2.Code.Value(error.code.value), message=error.message)
    info = error_details_pb2.ErrorInfo(reason=error.code.value, domain=ERROR_DOMAIN)
    status.details.add().Pack(info)
    if error.retryable or error.retry_after is not None:
        delay = duration_pb2.Duration()
        seconds = RETRY_DELAY_SECONDS if error.retry_after is None else error.retry_after
        delay.FromNanoseconds(int(seconds * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def to_grpc_status(error: ServiceError) -> grpc.Status:
    """For `await context.abort_with_status(to_grpc_status(error))`."""
    return rpc_status.to_status(status_proto(error))


def error_from_status(status: status_pb2.Status) -> ServiceError:
    """An in-stream google.rpc.Status → ServiceError (unknown codes become INTERNAL)."""
    name = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else ""
    code = StatusCode.__members__.get(name, StatusCode.INTERNAL)
    return ServiceError(code, status.message)


def error_from_rpc(error: grpc.RpcError) -> ServiceError:
    """A failed call (grpc.aio.AioRpcError) → ServiceError with the same code."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return ServiceError(StatusCode.__members__.get(code.name, StatusCode.INTERNAL), details or "")
