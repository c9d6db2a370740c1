"""What every ditserve service shares: one server lifecycle, gRPC options, errors, logs,
metrics. See lifecycle.py for the recipe."""

from .errors import chain_error_from_status, status_proto, to_grpc_status
from .grpc_options import MAX_MESSAGE_BYTES, channel_options, server_options
from .lifecycle import ServiceLifecycle
from .logs import configure_logging, log_event

__all__ = ["MAX_MESSAGE_BYTES", "ServiceLifecycle", "chain_error_from_status", "channel_options",
           "configure_logging", "log_event", "server_options", "status_proto", "to_grpc_status"]
