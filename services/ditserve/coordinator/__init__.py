"""The coordinator: the denoising loop with step-level continuous batching
(docs/ARCHITECTURE.md §3-4).

spec.py (a validated request) → request.py (its state and events) → scheduler.py (which
requests share a microbatch, and one step of each: plain data, no asyncio) → engine.py
(the async driver: the chain, retries, previews and decoding, each request's stream) →
outputs.py (previews and images) → protocol.py / servicer.py / model_info.py (dit.v1
CoordinatorService) → server.py (chain, handshake, lifecycle).
"""

from .engine import Engine
from .scheduler import QueueFull, Scheduler
from .spec import GenerationSpec

__all__ = ["Engine", "GenerationSpec", "QueueFull", "Scheduler"]
