"""Transport security and caller authentication of every ditserve service.

- `tls`: PEM files → grpcio credentials; server certificates re-read on change (dynamic
  SSL server credentials), client channels re-dialled after a rotation.
- `tokens`: the public API's bearer tokens, stored as sha256 hashes, re-read on change.
- `auth`: the server interceptor that checks tokens (coordinator) or peer identities
  (stages, decoder); grpc.health.v1 stays open for probes.
- `service`: one service's view of the pipeline's `security` section (config.py), used by
  the shared lifecycle (common/lifecycle.py) and the clients of internal hops.
- `flags`: the command-line flags of the service commands.

Nothing is imported here: the service commands import `flags` while building the CLI,
which must work from the client-only install (no grpc_health, no cryptography).
"""
