"""The scenarios on a GPU: CUDA, bf16 compute, SDPA (the model's attention).

    ditserve bench gpu                       # DiT-XL/2 at 256 px, distribution/throughput/peer

Runs `distribution`, `throughput` and `peer` with `device="cuda"`: stage processes load
their blocks in bf16 on the GPU (`ditserve stage --device cuda`, CUDA graphs per padded
batch size), the in-process monolith and diffusers run on the same GPU. Without a GPU it
says so and exits 2 (a CommandError). The one prepared, time-boxed check of a lent GPU
machine is scripts/gpu-check.sh (bench/gpucheck.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ditserve.common.status import CommandError

from . import distribution, peer, throughput
from .report import Report


class NoGPU(CommandError):
    """No CUDA device: the GPU scenario cannot run here."""


@dataclass
class Settings:
    """What `ditserve bench gpu` measures."""

    model: str = "DiT-XL/2"
    """DiT config by name."""
    latent_size: int = 32
    """Latent side: 32 is 256 px."""
    scenarios: tuple[str, ...] = ("distribution", "throughput", "peer")
    """Which CPU scenarios to repeat on the GPU."""
    device: str = "cuda"
    """The CUDA device."""

    @classmethod
    def quick(cls) -> Settings:
        return cls(model="DiT-Tiny/2", latent_size=8)


def settings_for(name: str, s: Settings):
    """The scenario's full settings, moved to the GPU and the chosen model."""
    if name == "distribution":
        return replace(distribution.Settings(), models=(s.model,), latent_size=s.latent_size,
                       device=s.device, threads=1, stage_threads=1)
    module = {"throughput": throughput, "peer": peer}[name]
    return replace(module.Settings(), model=s.model, latent_size=s.latent_size,
                   device=s.device, threads=1)


def run(s: Settings) -> Report:
    import torch

    if not torch.cuda.is_available():
        raise NoGPU("no CUDA device is available on this machine (torch "
                    f"{torch.__version__}, cuda {torch.version.cuda}); run it where a GPU is")
    modules = {"distribution": distribution, "throughput": throughput, "peer": peer}
    rows, samples, notes = [], {}, [f"GPU: {torch.cuda.get_device_name(0)}, bf16 compute, SDPA, CUDA graphs."]
    for name in s.scenarios:
        report = modules[name].run(settings_for(name, s))
        rows += [{"scenario": name, **row} for row in report.rows]
        samples[name] = report.samples
        notes += report.notes
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return Report("gpu", rows, [(k, k) for k in keys], samples, notes, asdict(s))
