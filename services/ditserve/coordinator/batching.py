"""Step-level continuous batching: which ready requests share the next microbatch, and
how their rows are laid out (DESIGN §4).

A microbatch holds whole requests (a request's conditional and null-class rows are never
split), all with the same latent shape, at whatever step each one is: the model takes a
timestep per row. Ready work is spread evenly over the free pipeline slots so that S
microbatches of similar size keep S stages busy (the bubble is (S-1)/(m+S-1), GPipe).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .request import RequestState


def plan_group(ready: Sequence[RequestState], free_slots: int,
               max_rows: int) -> list[RequestState]:
    """The requests of the next microbatch, oldest first: about 1/free_slots of the ready
    rows (so that the remaining slots get their share), at most max_rows, at least one
    request, only requests of the first one's latent shape."""
    if not ready or free_slots < 1:
        return []
    key = ready[0].latent_key
    compatible = [r for r in ready if r.latent_key == key]
    target = min(max_rows, math.ceil(sum(r.spec.rows for r in compatible) / free_slots))
    group, rows = [], 0
    for request in compatible:
        if group and rows + request.spec.rows > target:
            break
        group.append(request)
        rows += request.spec.rows
    return group


@dataclass
class MicrobatchInputs:
    """The stacked model inputs of a group, and where each request's rows are."""

    x: torch.Tensor
    """(N, C, L, L) float32 latents."""
    t: torch.Tensor
    """(N,) int64 model timesteps, one per row."""
    y: torch.Tensor
    """(N,) int64 class labels; the null class (= num_classes) on guidance rows."""
    offsets: list[int]
    """Row where each request's block starts: its n conditional rows, then n null rows."""


def stack_inputs(group: Sequence[RequestState], null_class: int) -> MicrobatchInputs:
    xs, ts, ys, offsets, row = [], [], [], [], 0
    for request in group:
        n, t = request.spec.num_images, request.sampler.model_timestep(request.step)
        copies = 2 if request.spec.guided else 1
        xs += [request.x] * copies
        ys.append(torch.tensor(request.spec.labels, dtype=torch.int64))
        if request.spec.guided:
            ys.append(torch.full((n,), null_class, dtype=torch.int64))
        ts.append(torch.full((n * copies,), t, dtype=torch.int64))
        offsets.append(row)
        row += n * copies
    return MicrobatchInputs(torch.cat(xs), torch.cat(ts), torch.cat(ys), offsets)


def split_output(out: torch.Tensor, group: Sequence[RequestState],
                 offsets: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Model output (N, C_out, L, L) → per request (conditional rows, null rows or None)."""
    parts = []
    for request, start in zip(group, offsets, strict=True):
        n = request.spec.num_images
        cond = out[start:start + n]
        uncond = out[start + n:start + 2 * n] if request.spec.guided else None
        parts.append((cond, uncond))
    return parts
