"""What can go wrong, as plain types shared by every service and command (no grpc here).

- `ServiceError` is the one status type of every service error: a microbatch that failed
  on the chain, a request refused at admission, a decoder that is down. Its `code` is a
  canonical gRPC status name; `common/errors.py` turns it into a gRPC status and back.
- `UserError` is the base of every mistake a user can fix (a configuration value, a
  checkpoint, a start-up check, a command's arguments): the `ditserve` command prints it
  as one line and exits 2, without a traceback.
"""

from __future__ import annotations

import enum


class StatusCode(enum.Enum):
    """Canonical status codes, by their gRPC names (docs/ARCHITECTURE.md §5)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    UNAVAILABLE = "UNAVAILABLE"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class ServiceError(Exception):
    """A failed call, microbatch or request, with its canonical code.

    UNAVAILABLE is the only retryable code: stages are stateless per microbatch, so a
    resend is safe, and a peer that is starting or restarting answers UNAVAILABLE.
    `retry_after` is the delay a caller is told to wait (a full queue says how long)."""

    def __init__(self, code: StatusCode, message: str, retry_after: float | None = None):
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.code is StatusCode.UNAVAILABLE


class UserError(Exception):
    """A mistake the user can fix; the message says what and where, in one line."""


class CommandError(UserError, ValueError):
    """A command's arguments that cannot work (a flag's value, a missing option); a
    ValueError too, as these were before, for callers that catch that."""
