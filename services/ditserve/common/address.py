"""HOST:PORT addresses, as flags, configs and gRPC write them ('[::1]:50051' for IPv6)."""

from __future__ import annotations

from .status import UserError


def split_host_port(address: str, what: str = "address",
                    error: type[UserError] = UserError) -> tuple[str, int]:
    """'127.0.0.1:50051' → ('127.0.0.1', 50051); '[::]:50051' → ('::', 50051). An empty
    host (':50051') is kept empty: gRPC reads it as every interface. Raises `error`, naming
    `what`, for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise error(f"{what} must be HOST:PORT, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def join_host_port(host: str, port: int) -> str:
    """'HOST:PORT', with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
