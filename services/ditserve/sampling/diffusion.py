"""Gaussian diffusion of DiT: linear betas, epsilon prediction, learned-range variance.

The math of the reference implementation, written anew: facebookresearch/DiT
`diffusion/gaussian_diffusion.py` (`GaussianDiffusion`), `diffusion/respace.py`
(`space_timesteps`, `SpacedDiffusion`) and `diffusion/diffusion_utils.py` (`normal_kl`,
`discretized_gaussian_log_likelihood`), themselves from openai/improved-diffusion and
guided-diffusion (Nichol & Dhariwal 2021).

As in the reference, the schedule is computed in float64 (numpy) and each coefficient is
cast to float32 when gathered for a batch, so per-step arithmetic runs in float32 and
matches the reference to float32 rounding. Timestep arguments `t` here are indices into
*this* (possibly respaced) schedule, 0..num_timesteps-1; `timestep_map[t]` is the
original 0..999 timestep at which the model is called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
"""Length of the base (training) schedule of every DiT checkpoint."""

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""model(x_t (N, C, H, W), original timesteps (N,)) -> output (N, 2C, H, W)."""


def linear_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Ho et al.'s linear schedule 1e-4..0.02, rescaled so that its limit is length-free."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The timesteps of the base process to keep, as the reference `space_timesteps`.

    `section_counts` is e.g. "250" or "10,15,20" (steps taken from equal sections), or
    "ddimN" (the DDIM paper's fixed integer stride, one section).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            return _ddim_stride(num_timesteps, int(section_counts[len("ddim"):]))
        section_counts = [int(c) for c in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        kept += _section_steps(start, size, count)
        start += size
    return set(kept)


def _section_steps(start: int, size: int, count: int) -> list[int]:
    """`count` steps spread over [start, start+size), Python-rounded as the reference."""
    if size < count:
        raise ValueError(f"cannot divide section of {size} steps into {count}")
    stride = 1 if count <= 1 else (size - 1) / (count - 1)
    # Accumulate by repeated addition, as the reference does: its float rounding decides
    # which way round() goes.
    cur, steps = 0.0, []
    for _ in range(count):
        steps.append(start + round(cur))
        cur += stride
    return steps


def _ddim_stride(num_timesteps: int, count: int) -> set[int]:
    """range(0, T, i) for the first integer stride i that yields exactly `count` steps."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == count:
            return set(range(0, num_timesteps, stride))
    raise ValueError(f"cannot create exactly {count} steps with an integer stride")


def respaced_betas(base_betas: np.ndarray, use_timesteps: set[int]) -> tuple[np.ndarray, list[int]]:
    """Betas of the process that keeps only `use_timesteps`, and its map to original steps.

    Keeps alphas_cumprod at the kept steps: beta_i = 1 - abar_i / abar_prev_kept.
    """
    alphas_cumprod = np.cumprod(1.0 - base_betas)
    last, betas, timestep_map = 1.0, [], []
    for i, abar in enumerate(alphas_cumprod):
        if i in use_timesteps:
            betas.append(1 - abar / last)
            last = abar
            timestep_map.append(i)
    return np.array(betas, dtype=np.float64), timestep_map


@dataclass
class MeanVariance:
    """p(x_{t-1} | x_t) as the model predicts it (all (N, C, H, W) float32)."""

    mean: torch.Tensor
    """Posterior mean q(x_{t-1} | x_t, x0 = pred_xstart)."""
    variance: torch.Tensor
    """Learned-range variance."""
    log_variance: torch.Tensor
    """Its log: frac * log(beta_t) + (1 - frac) * log(clipped posterior variance)."""
    pred_xstart: torch.Tensor
    """The predicted clean sample x0."""


class GaussianDiffusion:
    """A diffusion process with the given betas (float64), eps-prediction, learned-range var."""

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = list(timestep_map or range(self.num_timesteps))
        """Original (0..999) timestep of each index of this schedule."""
        self._init_schedule(betas)

    @classmethod
    def create(cls, respacing: str | Sequence[int] | None = None,
               num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> GaussianDiffusion:
        """As the reference `create_diffusion(respacing)`: linear betas, optionally respaced."""
        base = linear_betas(num_train_timesteps)
        if respacing is None or respacing == "":
            return cls(base)
        betas, timestep_map = respaced_betas(base, space_timesteps(num_train_timesteps, respacing))
        return cls(betas, timestep_map)

    def _init_schedule(self, betas: np.ndarray) -> None:
        """The float64 coefficient tables of q and of the posterior."""
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        one_minus_abar = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus_abar
        # The posterior variance is 0 at t=0: its log takes the value of t=1 there. A
        # 1-step schedule has no t=1 (the reference fails); use log(beta) instead.
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = (
            np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(betas))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus_abar
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / one_minus_abar)

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices (N,) of this schedule → original timesteps (N,) for the model."""
        return torch.tensor(self.timestep_map, device=t.device, dtype=t.dtype)[t]

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) with the given noise."""
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, _extract(self.posterior_variance, t, x_t),
                _extract(self.posterior_log_variance_clipped, t, x_t))

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
                                ) -> torch.Tensor:
        """x0 = sqrt(1/abar) x_t - sqrt(1/abar - 1) eps."""
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor
                                ) -> torch.Tensor:
        """The inverse of predict_xstart_from_eps."""
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> MeanVariance:
        """p(x_{t-1} | x_t) from the model output (N, 2C, H, W): eps, then v in [-1, 1]."""
        c = x_t.shape[1]
        if model_output.shape != (x_t.shape[0], 2 * c, *x_t.shape[2:]):
            raise ValueError(f"model output {tuple(model_output.shape)} is not (N, 2C, H, W) "
                             f"for x_t {tuple(x_t.shape)}")
        eps, var_values = torch.split(model_output, c, dim=1)
        min_log = _extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = _extract(np.log(self.betas), t, x_t)
        frac = (var_values + 1) / 2  # v = -1 → posterior variance, v = 1 → beta
        log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return MeanVariance(mean, torch.exp(log_variance), log_variance, pred_xstart)

    def p_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral step: (x_{t-1}, pred_xstart); no noise where t == 0."""
        out = self.p_mean_variance(model_output, x_t, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
        return out.mean + nonzero * torch.exp(0.5 * out.log_variance) * noise, out.pred_xstart

    def ddim_sample(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                    eta: float = 0.0, noise: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM step (Song et al. eq. 12): (x_{t-1}, pred_xstart); `noise` needed iff eta > 0."""
        out = self.p_mean_variance(model_output, x_t, t)
        eps = self.predict_eps_from_xstart(x_t, t, out.pred_xstart)
        abar = _extract(self.alphas_cumprod, t, x_t)
        abar_prev = _extract(self.alphas_cumprod_prev, t, x_t)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        sample = (out.pred_xstart * torch.sqrt(abar_prev)
                  + torch.sqrt(1 - abar_prev - sigma**2) * eps)
        if eta > 0:
            if noise is None:
                raise ValueError("ddim with eta > 0 needs noise")
            nonzero = (t != 0).float().view(-1, *([1] * (x_t.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return sample, out.pred_xstart

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """The hybrid loss of learned-sigma DiT training, per sample (N,): mse + vb.

        mse trains eps; vb (bits/dim) trains only the variance: the mean is detached in it,
        as the reference does. The model is called at the original timesteps.
        """
        x_t = self.q_sample(x_start, t, noise)
        model_output = model_fn(x_t, self.model_timesteps(t))
        c = x_start.shape[1]
        eps, var_values = torch.split(model_output, c, dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        vb = self.vb_terms_bpd(frozen, x_start, x_t, t)
        mse = _mean_flat((noise - eps) ** 2)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def vb_terms_bpd(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                     t: torch.Tensor) -> torch.Tensor:
        """One term of the variational bound in bits/dim (N,): the decoder NLL at t=0, else
        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, out.mean, out.log_variance)
        kl = _mean_flat(kl) / math.log(2)
        nll = -discretized_gaussian_log_likelihood(
            x_start, means=out.mean, log_scales=0.5 * out.log_variance)
        nll = _mean_flat(nll) / math.log(2)
        return torch.where(t == 0, nll, kl)


class SpacedDiffusion(GaussianDiffusion):
    """The reference `SpacedDiffusion`: keeps `use_timesteps` of a base process."""

    def __init__(self, use_timesteps: set[int], base_betas: np.ndarray | None = None):
        base = linear_betas() if base_betas is None else np.asarray(base_betas, dtype=np.float64)
        betas, timestep_map = respaced_betas(base, set(use_timesteps))
        self.original_num_steps = len(base)
        super().__init__(betas, timestep_map)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor,
              logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, *, means: torch.Tensor,
                                        log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) (nats, elementwise) of a Gaussian discretized to 256 bins over [-1, 1]."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    # The edge bins take the whole tail.
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (N, ...) → (N,)."""
    return x.mean(dim=list(range(1, x.ndim)))


def _extract(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] as float32 (N, 1, 1, ...), broadcastable to `like` (the reference's rounding)."""
    res = torch.from_numpy(arr).to(t.device)[t].float()
    return res.view(-1, *([1] * (like.ndim - 1)))
