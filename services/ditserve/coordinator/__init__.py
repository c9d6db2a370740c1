"""The coordinator: the denoising loop with step-level continuous batching (DESIGN §3-4).

spec.py (a validated request) → request.py (its state and events) → batching.py (which
requests share a microbatch) → engine.py (the loop, no gRPC) → outputs.py (previews and
decoding) → protocol.py / servicer.py / model_info.py (dit.v1 CoordinatorService) →
server.py (chain, handshake, lifecycle). measure.py reports throughput and utilisation.
"""

from .engine import Engine, QueueFull
from .spec import GenerationSpec

__all__ = ["Engine", "GenerationSpec", "QueueFull"]
