"""gRPC failures as one exception type, `DitserveError(code, message, retry_after)`.

The server attaches rich details (google.rpc.Status in the `grpc-status-details-bin`
trailer, as grpcio-status writes it); a RetryInfo detail there becomes `retry_after`,
the hint that RESOURCE_EXHAUSTED (queue full) and UNAVAILABLE carry.
Reference: https://google.aip.dev/193 (errors, RetryInfo).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class DitserveError(Exception):
    """A failed call: the canonical status code name, the server's message and, when the
    server gave one, how many seconds to wait before trying again. `result`: the Result
    the stream sent before it failed, if any (the decoder stayed down: a Result with the
    latents that were asked for and no images, then UNAVAILABLE), so nothing computed is
    lost to the caller of `generate_result`."""

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        hint = f" (retry after {retry_after:g} s)" if retry_after is not None else ""
        super().__init__(f"{code}: {message}{hint}")
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.result: Any = None


def _retry_delay(metadata: Iterable[tuple[str, str | bytes]] | None) -> float | None:
    """Seconds of the RetryInfo detail in the trailing metadata, if any."""
    for key, value in metadata or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                return info.retry_delay.ToNanoseconds() / 1e9
    return None


def _trailers(error: grpc.RpcError) -> Iterable[tuple[str, str | bytes]] | None:
    trailing = getattr(error, "trailing_metadata", None)
    return trailing() if callable(trailing) else None


def retry_info_delay(error: grpc.RpcError) -> float | None:
    """The RetryInfo delay (s) in the status details of `error`, if it has one."""
    return _retry_delay(_trailers(error))


def has_status_details(error: grpc.RpcError) -> bool:
    """Whether the status carries google.rpc.Status details: the server's own answer (every
    ditserve service attaches them), not one gRPC made up for a failed connection."""
    return any(key == STATUS_DETAILS_KEY for key, _ in _trailers(error) or ())


def from_rpc_error(error: grpc.RpcError, target: str = "") -> DitserveError:
    """A grpc (sync or aio) RpcError → DitserveError, with RetryInfo parsed."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else "") or ""
    if code is grpc.StatusCode.UNAVAILABLE and target:
        message = f"server {target} unavailable: {message}"
    elif code is grpc.StatusCode.DEADLINE_EXCEEDED and target:
        message = f"no answer from {target} within the deadline ({message})"
    return DitserveError(code.name, message, _retry_delay(_trailers(error)))
