"""One pipeline stage as a plain class: validate a microbatch, compute it, no gRPC.

Stage 0 turns (x, t, y) into tokens and conditioning with the embedders; every stage runs
its blocks; the last stage applies the final layer and returns the model output in FP32.
Activations leave in the wire dtype (bf16 by default), exactly as they would cross the
network, so an in-process chain of runners (chain/local.py) is numerically a remote one.

All compute runs on ONE dedicated thread per runner (docs/ARCHITECTURE.md §6): the
asyncio loop that serves health checks and streams never waits behind a forward pass.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ditserve.config import WireDtype
from ditserve.model import DiT, load_stage, open_checkpoint
from ditserve.model.checkpoint import CheckpointReader
from ditserve.model.configs import DiTConfig
from ditserve.model.graphs import CudaGraphs, graph_batch_sizes
from ditserve.wire import DTYPES, WIRE_DTYPE_NAMES, WireError
from ditserve.wire.codec import NAMES
from ditserve.wire.cuda_ipc import PinnedStaging

NUM_TIMESTEPS = 1000
"""Timesteps t must lie in [0, NUM_TIMESTEPS): the model's diffusion scale."""

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class StageDescription:
    """What one stage serves, as the handshake reports it (dit.v1.StageInfo)."""

    stage_index: int
    num_stages: int
    block_start: int
    block_end: int
    depth: int
    model_name: str
    model_config_json: str
    weight_hash: str
    wire_dtype: str
    address: str = ""
    device: str = "cpu/float32"
    max_batch_size: int = 0
    serving: bool = True



def compute_dtype(device: str) -> torch.dtype:
    """What a stage on `device` computes in: bf16 on CUDA (tensor cores, half the memory),
    float32 on the CPU (where bf16 GEMMs are slow)."""
    return torch.bfloat16 if device.startswith("cuda") else torch.float32

class StageRunner:
    """Blocks [start, end) of a DiT (with the embedders on stage 0, the head on the last)."""

    def __init__(self, model: DiT, blocks: tuple[int, int], stage_index: int = 0,
                 num_stages: int = 1, wire_dtype: WireDtype = "bf16", max_batch_size: int = 32,
                 weight_hash: str = "", address: str = "", cuda_graphs: bool = True):
        """`model` holds at least this stage's parts: its slice, or the whole model (then
        the runner runs a view of it that shares its modules, as the in-process chain
        does with one model for every emulated stage). `cuda_graphs`: on a CUDA device,
        replay the forward as CUDA graphs per padded batch size (model/graphs.py); never
        on a CPU."""
        self.config = model.config
        self.block_start, self.block_end = blocks
        self.stage_index, self.num_stages = stage_index, num_stages
        self.wire_datatype = WIRE_DTYPE_NAMES[wire_dtype]
        self.wire_torch_dtype = DTYPES[self.wire_datatype]
        self.max_batch_size = max_batch_size
        self.weight_hash, self.address = weight_hash, address
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        _check_holds(model, blocks)
        self.model = stage_view(model, blocks)
        self.graphs = (CudaGraphs(self._forward, graph_batch_sizes(max_batch_size))
                       if cuda_graphs and self.device.type == "cuda" else None)
        self.staging = PinnedStaging()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | CheckpointReader, blocks: tuple[int, int],
                        model_name: str | None = None, device: str = "cpu",
                        dtype: torch.dtype = torch.float32, **options: object) -> StageRunner:
        """Reads only this stage's tensors, opening the file once (or not at all when
        given an open reader); `options` as in the constructor."""
        reader = (checkpoint if isinstance(checkpoint, CheckpointReader)
                  else open_checkpoint(checkpoint, model_name))
        model = load_stage(reader, blocks, device=device, dtype=dtype)
        return cls(model, blocks, weight_hash=reader.weight_hash(), **options)

    @property
    def is_first(self) -> bool:
        return self.block_start == 0

    @property
    def is_last(self) -> bool:
        return self.block_end == self.config.depth

    # -- validation: every tensor from outside, with a message naming what is wrong --

    def max_payload_bytes(self) -> int:
        """Largest valid request payload, for the frame assembler's limit."""
        n, cfg = self.max_batch_size, self.config
        if self.is_first:
            return n * (cfg.in_channels * cfg.input_size ** 2 * 8 + 16)
        return n * (cfg.num_tokens + 1) * cfg.hidden_size * self.wire_torch_dtype.itemsize

    def max_output_bytes(self) -> int:
        """Largest payload this stage sends on: h (N, T, D) and c (N, D) in the wire dtype
        at max_batch_size rows (the size of the next hop's shared-memory slots)."""
        cfg = self.config
        return (self.max_batch_size * (cfg.num_tokens + 1) * cfg.hidden_size
                * self.wire_torch_dtype.itemsize)

    def validate(self, tensors: Tensors) -> Tensors:
        """Checks names, dtypes, shapes and ranges of a request microbatch (WireError)."""
        return self._validate_first(tensors) if self.is_first else self._validate_later(tensors)

    def _validate_first(self, tensors: Tensors) -> Tensors:
        cfg = self.config
        x, t, y = _named(tensors, ("x", "t", "y"))
        n = self._batch(x, "x")
        _expect_shape(x, "x", (n, cfg.in_channels, cfg.input_size, cfg.input_size))
        _expect_dtype(x, "x", (torch.float32, torch.float16, torch.bfloat16))
        _expect_shape(t, "t", (n,))
        _expect_dtype(t, "t", (torch.int64, torch.float32))
        _expect_shape(y, "y", (n,))
        _expect_dtype(y, "y", (torch.int64,))
        if not bool(((t >= 0) & (t < NUM_TIMESTEPS)).all()):
            raise WireError(f"t: timesteps must lie in [0, {NUM_TIMESTEPS}), got "
                            f"{t[~((t >= 0) & (t < NUM_TIMESTEPS))][0].item()}")
        labels = cfg.num_classes + (1 if cfg.has_null_class else 0)
        if not bool(((y >= 0) & (y < labels)).all()):
            raise WireError(f"y: class labels must lie in [0, {labels - 1}] "
                            f"({cfg.num_classes} classes"
                            f"{' and the null class' if cfg.has_null_class else ''}), got "
                            f"{y[~((y >= 0) & (y < labels))][0].item()}")
        if not bool(torch.isfinite(x).all()):
            raise WireError("x: latents hold NaN or infinity")
        return {"x": x, "t": t, "y": y}

    def _validate_later(self, tensors: Tensors) -> Tensors:
        cfg = self.config
        h, c = _named(tensors, ("h", "c"))
        n = self._batch(h, "h")
        _expect_shape(h, "h", (n, cfg.num_tokens, cfg.hidden_size))
        _expect_shape(c, "c", (n, cfg.hidden_size))
        for tensor, name in ((h, "h"), (c, "c")):
            _expect_dtype(tensor, name, (self.wire_torch_dtype,))
        return {"h": h, "c": c}

    def _batch(self, tensor: torch.Tensor, name: str) -> int:
        if tensor.dim() < 1 or tensor.shape[0] < 1:
            raise WireError(f"{name}: shape {list(tensor.shape)} has no batch rows")
        if tensor.shape[0] > self.max_batch_size:
            raise WireError(f"{name}: batch of {tensor.shape[0]} rows exceeds this stage's "
                            f"max_batch_size {self.max_batch_size}")
        return tensor.shape[0]

    # -- compute --

    @torch.inference_mode()
    def compute(self, inputs: Tensors, on_device: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Validated inputs → ("h", "c") in the wire dtype, or ("out",) FP32 if last: in
        host memory, or with `on_device` left where they were computed (for a next hop
        that takes them by CUDA IPC handle)."""
        if self.is_first:
            args = (inputs["x"].to(self.device, self.dtype),  # (N, C, L, L)
                    inputs["t"].to(self.device, torch.float32),  # (N,): one dtype per graph
                    inputs["y"].to(self.device))  # (N,)
        else:
            args = (inputs["h"].to(self.device, self.dtype),  # (N, T, D)
                    inputs["c"].to(self.device, self.dtype))  # (N, D)
        outputs = (self.graphs or self._forward)(*args)
        if not on_device:
            outputs = self._to_host(outputs)
        elif self.device.type == "cuda":
            # Complete before they are handed over: the receiver's import then waits for
            # its copy only, and never blocks its event loop behind our kernels.
            torch.cuda.current_stream(self.device).synchronize()
        if self.is_last:
            return [("out", outputs[0])]  # (N, C_out, L, L)
        return [("h", outputs[0]), ("c", outputs[1])]  # (N, T, D), (N, D)

    def _to_host(self, tensors: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """Device tensors' copies in host memory for the wire, through the one staging
        path (wire/cuda_ipc.PinnedStaging: page-locked buffers, non_blocking copies),
        waited for here, on the compute thread, so the bytes are complete before the loop
        reads them. CPU tensors pass through. (Written for GPU stages; no GPU was
        available when it was written: it has never run on one.)"""
        host, _, events = self.staging.to_host_all(tensors)
        for event in events:
            event.synchronize()
        # The buffers are not given back: a frame's bytes live as long as the frame, and
        # torch's caching host allocator reuses a page-locked block once it is freed.
        return host

    def _forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """On the device: (x, t, y) or (h, c) → (h, c) in the wire dtype, or (out,) FP32
        (N, C_out, L, L) on the last stage. What a CUDA graph captures."""
        h, c = self.model.embed(*args) if self.is_first else args
        h = self.model.run_blocks(h, c)  # (N, T, D)
        if self.is_last:
            return (self.model.head(h, c).float(),)
        return h.to(self.wire_torch_dtype), c.to(self.wire_torch_dtype)

    def compute_timed(self, inputs: Tensors, on_device: bool = False,
                      ) -> tuple[list[tuple[str, torch.Tensor]], float]:
        start = time.perf_counter()
        outputs = self.compute(inputs, on_device)
        return outputs, time.perf_counter() - start

    async def submit(self, inputs: Tensors, on_device: bool = False,
                     ) -> tuple[list[tuple[str, torch.Tensor]], float]:
        """`compute` on the runner's compute thread; returns outputs and seconds taken."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.compute_timed, inputs,
                                          on_device)

    def example_inputs(self, n: int = 1) -> Tensors:
        """A valid microbatch of n rows (for the warm-up forward)."""
        cfg = self.config
        if self.is_first:
            return {"x": torch.zeros(n, cfg.in_channels, cfg.input_size, cfg.input_size),
                    "t": torch.zeros(n, dtype=torch.int64),
                    "y": torch.zeros(n, dtype=torch.int64)}
        return {"h": torch.zeros(n, cfg.num_tokens, cfg.hidden_size, dtype=self.wire_torch_dtype),
                "c": torch.zeros(n, cfg.hidden_size, dtype=self.wire_torch_dtype)}

    async def warm_up(self) -> float:
        """One forward on the compute thread before the stage reports SERVING."""
        _, seconds = await self.submit(self.example_inputs())
        return seconds

    def describe(self, serving: bool = True) -> StageDescription:
        return StageDescription(
            stage_index=self.stage_index, num_stages=self.num_stages,
            block_start=self.block_start, block_end=self.block_end, depth=self.config.depth,
            model_name=self.config.name, model_config_json=self.config.to_json(),
            weight_hash=self.weight_hash, wire_dtype=self.wire_datatype, address=self.address,
            device=f"{self.device}/{str(self.dtype).removeprefix('torch.')}",
            max_batch_size=self.max_batch_size, serving=serving)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _check_holds(model: DiT, blocks: tuple[int, int]) -> None:
    start, end = blocks
    if start == 0 and not model.has_embedders:
        raise ValueError("stage starting at block 0 needs a model with the embedders")
    if end == model.config.depth and not model.has_final_layer:
        raise ValueError("the last stage needs a model with the final layer")
    missing = [i for i in range(start, end) if str(i) not in model.blocks]
    if missing:
        raise ValueError(f"model lacks blocks {missing[0]}..{missing[-1]} of this stage")


def stage_view(model: DiT, blocks: tuple[int, int]) -> DiT:
    """The slice of `model` for blocks [start, end), sharing its modules (nothing is
    copied): with the embedders when it starts at block 0, the final layer when it ends
    at the last block. `model` itself when it is that slice already."""
    start, end = blocks
    first, last = start == 0, end == model.config.depth
    if (model.block_range == blocks and model.has_embedders == first
            and model.has_final_layer == last):
        return model
    view = DiT(model.config, (start, start), embedders=False, final_layer=False)  # empty
    view.block_range = blocks
    view.blocks = nn.ModuleDict({str(i): model.blocks[str(i)] for i in range(start, end)})
    if first:
        for name in ("x_embedder", "t_embedder", "y_embedder", "pos_embed"):
            setattr(view, name, getattr(model, name))
    if last:
        view.final_layer = model.final_layer
    return view.eval()


def _named(tensors: Tensors, names: tuple[str, ...]) -> list[torch.Tensor]:
    if set(tensors) != set(names):
        raise WireError(f"expected tensors {', '.join(names)}, got {', '.join(tensors) or 'none'}")
    return [tensors[name] for name in names]


def _expect_shape(tensor: torch.Tensor, name: str, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise WireError(f"{name}: shape {list(tensor.shape)}, this model needs {list(shape)}")


def _expect_dtype(tensor: torch.Tensor, name: str, dtypes: tuple[torch.dtype, ...]) -> None:
    if tensor.dtype not in dtypes:
        allowed = " or ".join(NAMES[d] for d in dtypes)
        raise WireError(f"{name}: datatype {NAMES[tensor.dtype]}, expected {allowed}")


class RelayRunner(StageRunner):
    """Benchmark-only stage that skips its blocks (`ditserve stage --relay`): it takes
    h (N, T, D) and c (N, D) in the wire dtype at any position, validates them exactly as
    a later stage does, and passes them on unchanged; the last one replies with c as
    "out". So `ditserve bench transport` measures the data plane (receive, validate,
    forward, reply) through the real servicer and client, with no compute in the way."""

    def __init__(self, config: DiTConfig, stage_index: int = 0, num_stages: int = 1,
                 wire_dtype: WireDtype = "bf16", max_batch_size: int = 32, address: str = ""):
        self.config = config
        self.block_start, self.block_end = stage_index, stage_index + 1
        self.stage_index, self.num_stages = stage_index, num_stages
        self.wire_datatype = WIRE_DTYPE_NAMES[wire_dtype]
        self.wire_torch_dtype = DTYPES[self.wire_datatype]
        self.max_batch_size = max_batch_size
        self.weight_hash, self.address = "relay", address
        self.device, self.dtype = torch.device("cpu"), self.wire_torch_dtype
        self._last = stage_index == num_stages - 1
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    @property
    def is_first(self) -> bool:
        return False  # a relay takes (h, c) even at position 0

    @property
    def is_last(self) -> bool:
        return self._last

    async def submit(self, inputs: Tensors, on_device: bool = False,
                     ) -> tuple[list[tuple[str, torch.Tensor]], float]:
        """On the loop: there is nothing to compute, so no hand-off to a compute thread
        (a real stage's costs ~0.04 ms idle, ~1 ms on a loaded 2-core machine: BENCHMARKS)."""
        return self.compute_timed(inputs)

    def compute(self, inputs: Tensors, on_device: bool = False) -> list[tuple[str, torch.Tensor]]:
        if self._last:
            return [("out", inputs["c"])]  # (N, D): a small reply, as the real one is
        return [("h", inputs["h"]), ("c", inputs["c"])]

    def describe(self, serving: bool = True) -> StageDescription:
        return dataclasses.replace(super().describe(serving), block_start=self.stage_index,
                                   block_end=self.stage_index + 1, depth=self.num_stages,
                                   device="cpu/relay")
