"""A stage worker: one slice of DiT blocks served over gRPC in a relay chain (docs/ARCHITECTURE.md §1)."""

from .runner import StageRunner

__all__ = ["StageRunner"]
