"""Stochastic flow-matching steps with log-probabilities (spec §1) and the KL term (spec §4).

A denoising step goes from ``sample`` at noise level ``sigma`` to ``prev_sample`` at
``sigma_next < sigma`` (diffusers' naming: "prev" is the less noisy state). All maths runs in
float32 whatever the input dtype; the functions are stateless (no scheduler step index).

Two kinds of step (`StepKind`, each carrying its noise level ``a``):

* ``"sde"`` (Flow-GRPO, `SDEStep`): ``std = a·sqrt(σ / (1 - σ))``, Gaussian transition with standard
  deviation ``std·sqrt(-dt)``; log-prob is the full Gaussian log-density.
* ``"cps"`` (coefficients-preserving sampling, TP-GRPO's default, `CPSStep`): ``std = σ_next·sin(a·π/2)``;
  log-prob is ``-(x_next - mean)²`` with constants dropped (they cancel in the PPO ratio).

Log-probs are averaged over all non-batch dimensions, as in the research code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor


def _per_sample(value: float | Tensor, batch: int, ndim: int, device: torch.device) -> Tensor:
    """A float or (B,) tensor as float32 of shape (B, 1, ..., 1) for broadcasting over ``ndim`` dims."""
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    if value.ndim == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"sigma must be a float or a tensor of shape ({batch},), got {tuple(value.shape)}")
    return value.reshape(batch, *([1] * (ndim - 1)))


def _mean_over_sample_dims(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass(frozen=True)
class StepKind:
    """A kind of stochastic step with its noise level ``a`` (spec §1): one value, checked once.

    Subclasses give the noise scale (`std`), the transition's mean and standard deviation, and the
    log-density of a taken step; `step_kind` builds one by name.
    """

    noise_level: float
    name: ClassVar[str] = ""
    max_noise_level: ClassVar[float] = math.inf
    noiseless_into_zero: ClassVar[bool] = False  # a step into sigma 0 has no noise (no log-prob to train)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_level) and 0.0 <= self.noise_level <= self.max_noise_level):
            raise ValueError(
                f"noise_level of a {self.name!r} step must be in [0, {self.max_noise_level:g}], got {self.noise_level}"
            )

    def std(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """Noise scale of one step, the ``std`` that the KL term divides by; shapes follow ``sigma``."""
        raise NotImplementedError

    def transition(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and the standard deviation of the Gaussian transition from ``x``."""
        raise NotImplementedError

    def log_density(self, taken: Tensor, mean: Tensor, transition_std: Tensor) -> Tensor:
        """Per-element log-density of ``taken`` (``transition_std`` never 0 here)."""
        raise NotImplementedError


@dataclass(frozen=True)
class SDEStep(StepKind):
    """Flow-GRPO's step: ``std = a·sqrt(σ / (1 - σ))`` with σ = 1 replaced by ``sigma_next`` in the
    denominator (the next sigma below 1, as the research code does); the transition's standard
    deviation is ``std·sqrt(-dt)``; the log-prob is the full Gaussian log-density."""

    name: ClassVar[str] = "sde"

    def std(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
        denominator_sigma = torch.where(sigma >= 1.0, sigma_next, sigma)
        return self.noise_level * torch.sqrt(sigma / (1.0 - denominator_sigma))

    def transition(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        dt = s_next - s
        mean = x * (1 + std**2 * dt / (2 * s)) + v * (1 + std**2 * (1 - s) / (2 * s)) * dt
        return mean, std * torch.sqrt(-dt)

    def log_density(self, taken: Tensor, mean: Tensor, transition_std: Tensor) -> Tensor:
        return -((taken - mean) ** 2) / (2 * transition_std**2) - torch.log(transition_std) - 0.5 * math.log(2 * math.pi)


@dataclass(frozen=True)
class CPSStep(StepKind):
    """Coefficients-preserving sampling, TP-GRPO's default: ``std = σ_next·sin(a·π/2)``, the
    transition's standard deviation itself; the log-prob is ``-(x_next - mean)²`` with constants
    dropped (they cancel in the PPO ratio)."""

    name: ClassVar[str] = "cps"
    max_noise_level: ClassVar[float] = 1.0
    noiseless_into_zero: ClassVar[bool] = True  # std = σ_next·sin(a·π/2) is 0 at σ_next = 0

    def std(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32)
        return sigma_next * math.sin(self.noise_level * math.pi / 2)

    def transition(self, x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        clean = x - s * v
        noise_estimate = x + (1 - s) * v
        return (1 - s_next) * clean + torch.sqrt((s_next**2 - std**2).clamp_min(0)) * noise_estimate, std

    def log_density(self, taken: Tensor, mean: Tensor, transition_std: Tensor) -> Tensor:
        return -((taken - mean) ** 2)


STEP_KINDS: dict[str, type[StepKind]] = {"cps": CPSStep, "sde": SDEStep}


def step_kind(name: str, noise_level: float) -> StepKind:
    """The step ``name`` ("cps" or "sde") at ``noise_level``; ValueError for an unknown name or a level out of its range."""
    if name not in STEP_KINDS:
        raise ValueError(f"unknown step kind {name!r}; choose one of {tuple(STEP_KINDS)}")
    return STEP_KINDS[name](noise_level)


def sde_step(
    velocity: Tensor,
    sample: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    step: StepKind,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One stochastic denoising step and the log-probability of the step taken.

    Args:
        velocity: (B, ...) predicted velocity ``v`` at ``sample`` (after guidance).
        sample: (B, ...) current state ``x`` at ``sigma``.
        sigma, sigma_next: floats or (B,) tensors with ``sigma_next < sigma``.
        step: the kind of step and its noise level (`step_kind`); level 0 gives the deterministic
            Euler step ``x + v·dt``.
        prev_sample: the action whose log-prob is wanted (a stored transition); when given it
            is returned unchanged and no noise is drawn.
        generator: random source for the noise when ``prev_sample`` and ``noise`` are None.
        noise: (B, ...) standard normal ``ε`` to use instead of drawing one.

    Returns:
        ``(prev_sample, log_prob, mean)``: next state (B, ...) float32 (or the given
        ``prev_sample`` unchanged), log-prob (B,) float32, and the transition mean (B, ...)
        float32. Steps with zero noise have log-prob 0 (they are deterministic).
    """
    if not isinstance(step, StepKind):
        raise TypeError(f"step must be a StepKind (tpgrpo.maths.sde.step_kind), got {step!r}")
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity {tuple(velocity.shape)} and sample {tuple(sample.shape)} differ in shape")
    if prev_sample is not None and prev_sample.shape != sample.shape:
        raise ValueError(f"prev_sample {tuple(prev_sample.shape)} and sample {tuple(sample.shape)} differ in shape")
    batch, ndim, device = sample.shape[0], sample.ndim, sample.device
    x = sample.float()
    v = velocity.float()
    s = _per_sample(sigma, batch, ndim, device)
    s_next = _per_sample(sigma_next, batch, ndim, device)
    if bool((s_next >= s).any()):
        raise ValueError("sigma_next must be smaller than sigma (steps go from noise to image)")
    mean, transition_std = step.transition(x, v, s, s_next, step.std(s, s_next))

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        elif noise.shape != x.shape:
            raise ValueError(f"noise {tuple(noise.shape)} and sample {tuple(x.shape)} differ in shape")
        prev_sample = mean + transition_std * noise.float()
        taken = prev_sample
    else:
        taken = prev_sample.detach().float()

    deterministic = transition_std == 0
    safe_std = torch.where(deterministic, torch.ones_like(transition_std), transition_std)
    log_density = torch.where(deterministic, 0.0, step.log_density(taken, mean, safe_std))
    return prev_sample, _mean_over_sample_dims(log_density), mean


def ode_step(velocity: Tensor, sample: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """Deterministic Euler step ``x + v·(σ_next - σ)`` in float32, (B, ...) -> (B, ...)."""
    batch, ndim, device = sample.shape[0], sample.ndim, sample.device
    dt = _per_sample(sigma_next, batch, ndim, device) - _per_sample(sigma, batch, ndim, device)
    return sample.float() + velocity.float() * dt


def kl_to_reference(mean: Tensor, reference_mean: Tensor, std: float | Tensor) -> Tensor:
    """KL term of spec §4: ``mean(||mean - reference_mean||²) / (2·std²)`` per sample, (B,).

    ``std`` is `step_std` of the step (a float or (B,) tensor). Steps with zero std have no
    stochastic policy and contribute 0.
    """
    if mean.shape != reference_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and reference {tuple(reference_mean.shape)} differ in shape")
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device).reshape(-1)
    if std.numel() == 1:
        std = std.expand(mean.shape[0])
    squared = _mean_over_sample_dims((mean.float() - reference_mean.float()) ** 2)
    safe = torch.where(std == 0, torch.ones_like(std), std)
    return torch.where(std == 0, torch.zeros_like(squared), squared / (2 * safe**2))
