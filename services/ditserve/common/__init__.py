"""What every ditserve service shares, one module per concept (import them by name):
status.py (the one status type, and the user-error base; no dependencies), errors.py
(that status on gRPC), lifecycle.py (one server lifecycle; see it for the recipe),
grpc_options.py, logs.py, metrics.py.

Nothing is imported here, so that the client-only install can use `common.status`."""
