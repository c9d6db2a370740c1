"""Numerical comparisons for the suite: errors measured against a tensor's own scale.

float32 results legitimately differ between x86-64 CPUs: torch picks AVX-512, AVX2 or
scalar kernels at run time, and MKL/oneDNN choose blockings by shape, so a sum is
accumulated in a different order on another machine (or for another batch size on the
same machine). An element-wise `rtol` then fails on the elements that happen to be near
zero while the tensor is right, which is how the suite once failed on an AVX2-only CPU
(max |a - b| = 6.8e-5 on latents of magnitude ~360: 2e-7 of the scale, 7e-5 of one small
element). So every float comparison here is

    scaled error = max|actual - expected| / max|expected|

the worst element's error in units of the tensor's magnitude, and each bound below is
derived from float32's unit roundoff and how the computation grows error. Bounds were
checked on this machine with ATEN_CPU_CAPABILITY=default / avx2 / avx512 (plus
MKL_ENABLE_INSTRUCTIONS and ONEDNN_MAX_CPU_ISA to match); each states the largest error
seen then, so the margin is visible.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_ROUNDOFF_FP32 = 2.0**-24  # 6.0e-8: the relative error of one float32 rounding
UNIT_ROUNDOFF_BF16 = 2.0**-9  # 2.0e-3: bf16 keeps 8 bits of mantissa

# One forward pass of a small DiT in float32. A dot product of length K carries about
# sqrt(K) * u of relative error in practice (K * u in the worst case); the tiny models
# here have K <= 256 (the MLP's hidden width), and LayerNorm before every block keeps the
# error from compounding across blocks, so a different accumulation order moves the
# output by ~1e-6 of its scale. Bound: 2e-5 (~330 u, > 10x what any kernel choice gives:
# seen <= 1.1e-6), far below what a real mistake does (a wrong eps or chunk order moves
# the output by > 1e-2 of its scale).
FORWARD_FP32 = 2e-5

# A whole sampling run: each step's model output carries ~1e-6 (of its scale) of
# kernel-dependent rounding (see FORWARD_FP32; seen <= 1.1e-6), guidance multiplies the
# difference of two outputs by the scale s (error up to (1 + 2s) times one output's), and
# the sampler adds the steps' errors roughly linearly.
PER_FORWARD_ROUNDING = 1e-6


def sampling_bound(steps: int, guidance: float = 1.0) -> float:
    """Scaled-error bound for `steps` sampler steps at guidance `s`: steps x (1 + 2s) x 1e-6,
    with a floor of 1e-5. 10 steps at s = 4: 9e-5 (seen <= 7e-7 across CPUs)."""
    return max(1e-5, steps * (1 + 2 * max(guidance, 1.0)) * PER_FORWARD_ROUNDING)


SAMPLING_FP32 = sampling_bound(10, 4.0)

# Elementwise float32 formulas (a few multiply-adds per element, no reductions): a handful
# of roundings, each u relative, in either direction. Bound: 1e-5 of the scale.
ELEMENTWISE_FP32 = 1e-5

# The same model cut into stages with bf16 activations between them: each hop rounds h
# and c to bf16 (relative error <= u_bf16 = 2e-3 per element); the blocks after a hop
# carry that forward without renormalising it away, so with up to 3 hops the output moves
# by a few u_bf16 of its scale. Seen <= 3.0e-3 (1.5 u_bf16) through 3 stages of the tiny
# model. Bound: 10 u_bf16 = 0.02; the fp32 wire meets FORWARD_FP32.
FORWARD_BF16_WIRE = 10 * UNIT_ROUNDOFF_BF16


def scaled_error(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, computed in float64."""
    a = _as_float64(actual)
    b = _as_float64(expected)
    assert a.shape == b.shape, f"shape {a.shape} != expected {b.shape}"
    if not np.isfinite(a).all():
        return float("inf")
    scale = float(np.abs(b).max()) if b.size else 0.0
    error = float(np.abs(a - b).max()) if b.size else 0.0
    return error / scale if scale > 0 else error


def assert_scaled_close(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor,
                        bound: float, what: str = "tensor") -> None:
    """Fails when the scaled error exceeds `bound`, naming the error and the scale."""
    error = scaled_error(actual, expected)
    scale = float(np.abs(_as_float64(expected)).max()) if np.size(expected) else 0.0
    assert error <= bound, (f"{what}: max|a - b| / max|b| = {error:.3g} > {bound:.3g} "
                            f"(scale max|b| = {scale:.4g})")


def _as_float64(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to(torch.float64).cpu().numpy()
    return np.asarray(value, dtype=np.float64)
