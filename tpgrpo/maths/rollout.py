"""TP-GRPO rollouts (spec §1–2): main trajectory, pure-ODE baseline and ODE branch completions.

For each image of a batch, with ``T`` steps and an SDE window of ``W`` steps starting at ``s``:

* the **main trajectory** takes ODE steps before the window, SDE steps ``s … s+W-1`` inside it
  and ODE steps after it; its final image is completion ``k = W``;
* the **baseline** (completion ``k = 0``) is the pure-ODE run from the same initial noise;
* **branch** ``k = 1 … W-1`` completes the main state after ``k`` SDE steps by ODE steps.

Two implementations give the same numbers (to float tolerance) for the same noise:

* `rollout_sequential` is the readable definition and the benchmark baseline. It is scheduled
  like the research code: main trajectory, then the baseline from ``x_0`` over all ``T`` steps,
  then each branch separately, one image-batch call per step, every velocity recomputed.
* `rollout` is the engine. It evaluates each velocity once: the ODE step of a completion
  leaving the main trajectory at ``x_j`` reuses the main trajectory's velocity at ``x_j``
  (same state and sigma, same velocity), the baseline shares the main trajectory's ODE prefix
  before the window, and at each timestep every live trajectory (main, baseline, branches)
  is evaluated in one batched call, split into chunks of at most ``max_batch`` latents.

The model enters only through a velocity callable (no diffusers, no Lightning here)::

    velocity_fn(latents (N, C, h, w) float32, sigma: float, rows: LongTensor (N,)) -> (N, C, h, w)

where ``rows[i]`` is the batch index of the image that latent ``i`` belongs to (the caller uses
it to select that image's text conditioning). Classifier-free guidance lives inside
``velocity_fn``: one evaluation of one latent is one CFG pair and counts as one NFE.

The SDE noise of the whole window is drawn up front as one (B, W, C, h, w) tensor, so both
implementations consume the same random numbers in the same order.

Approximation, off by default: ``branch_steps = m`` completes the baseline (from ``x_s``) and
the branches with ``m`` ODE steps on a coarser grid (`completion_grid`) instead of all remaining
steps. The main trajectory, its states and log-probs are unchanged; the completion rewards, and
with them the turning points, change, and little of the exact turning points survives at small
``m`` (``benchmarks/rollout.py`` measures the overlap; docs/benchmarks.md has the figures): use it
knowingly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from tpgrpo.maths.sde import StepKind, ode_step, sde_step

VelocityFn = Callable[[Tensor, float, Tensor], Tensor]


@dataclass
class Rollout:
    """One rollout batch of ``B`` images with ``T`` steps and an SDE window of ``W`` steps.

    Attributes:
        sigmas: (T+1,) float32 noise levels, ``sigmas[0]`` (noise) down to ``sigmas[T]``.
        window_start: ``s``, the first SDE step.
        window_size: ``W``, the number of SDE (trained) steps.
        states: (B, W+1, C, h, w) main-trajectory states ``x_s … x_{s+W}``; trained transition
            ``i`` goes from ``states[:, i]`` at ``sigmas[s+i]`` to ``states[:, i+1]`` at
            ``sigmas[s+i+1]``.
        log_probs: (B, W) log-probabilities of those transitions when they were sampled.
        final_latents: (B, K, C, h, w) final latents. With branches ``K = W+1`` and index ``k``
            is the image completed by ODE after ``k`` SDE steps (0: the pure-ODE baseline,
            W: the main trajectory); without branches ``K = 1`` (the main trajectory only).
        nfe_per_image: velocity evaluations spent per image (a CFG pair counts once).
        transformer_calls: number of ``velocity_fn`` calls, after micro-batching.
        branch_steps: ODE steps per completion when the approximation was used, else None.
    """

    sigmas: Tensor
    window_start: int
    window_size: int
    states: Tensor
    log_probs: Tensor
    final_latents: Tensor
    nfe_per_image: int
    transformer_calls: int
    branch_steps: int | None = None

    @property
    def num_steps(self) -> int:
        """``T``, the number of denoising steps."""
        return self.sigmas.shape[0] - 1

    @property
    def trained_sigmas(self) -> Tensor:
        """(W,) sigma at the start of each trained transition, ``sigmas[s : s+W]``."""
        return self.sigmas[self.window_start : self.window_start + self.window_size]

    @property
    def trained_sigmas_next(self) -> Tensor:
        """(W,) sigma at the end of each trained transition, ``sigmas[s+1 : s+W+1]``."""
        return self.sigmas[self.window_start + 1 : self.window_start + self.window_size + 1]

    @property
    def main_latents(self) -> Tensor:
        """(B, C, h, w) final latents of the main trajectory (the last completion)."""
        return self.final_latents[:, -1]


def sample_window_start(
    num_steps: int,
    window_size: int,
    window_range: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Draw the SDE window start ``s`` uniformly from ``[lo, hi - W]`` (spec §1), inclusive.

    ``window_range = (lo, hi)`` bounds the steps the window may cover: steps ``s … s+W-1`` all
    lie in ``[lo, hi)``. It defaults to ``(0, num_steps)``. SD3.5-M: ``T = 10, W = 9,
    (0, 9)`` always gives ``s = 0``.
    """
    lo, hi = (0, num_steps) if window_range is None else window_range
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= window_size <= num_steps:
        raise ValueError(f"window_size must be in [1, num_steps={num_steps}], got {window_size}")
    if not 0 <= lo < hi <= num_steps:
        raise ValueError(f"window_range must satisfy 0 <= lo < hi <= num_steps={num_steps}, got ({lo}, {hi})")
    if hi - lo < window_size:
        raise ValueError(f"a window of {window_size} steps does not fit in window_range ({lo}, {hi})")
    return int(torch.randint(lo, hi - window_size + 1, (1,), generator=generator).item())


def completion_grid(start: int, num_steps: int, branch_steps: int | None = None) -> list[int]:
    """Sigma indices an ODE completion from step index ``start`` visits, ``start`` … ``num_steps``.

    Exact (``branch_steps=None``): every remaining index. Approximation: ``branch_steps`` steps
    on the scheduler's own grid, indices ``round(linspace(start, T, branch_steps + 1))`` (all
    remaining indices when fewer than ``branch_steps`` steps remain). Keeping the indices on the
    grid keeps the scheduler's shift, and lets the engine batch completions with the main
    trajectory at shared sigmas.
    """
    remaining = num_steps - start
    if branch_steps is None or branch_steps >= remaining:
        return list(range(start, num_steps + 1))
    points = torch.linspace(start, num_steps, branch_steps + 1, dtype=torch.float64).round()
    return [int(p) for p in points]


def _completion_steps(start: int, num_steps: int, branch_steps: int | None) -> int:
    return len(completion_grid(start, num_steps, branch_steps)) - 1


def _check_window(num_steps: int, window_start: int, window_size: int) -> None:
    if num_steps < 1:
        raise ValueError(f"need at least one step, got {num_steps}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if window_start < 0 or window_start + window_size > num_steps:
        raise ValueError(
            f"window [{window_start}, {window_start + window_size}) does not fit in {num_steps} steps"
        )


def _check_branch_steps(branch_steps: int | None) -> None:
    if branch_steps is not None and branch_steps < 1:
        raise ValueError(f"branch_steps must be >= 1 or None, got {branch_steps}")


def minimum_nfe(
    num_steps: int, window_start: int, window_size: int, branches: bool = True, branch_steps: int | None = None
) -> int:
    """Velocity evaluations per image spent by `rollout` (the minimum for an exact rollout).

    Exact: ``T + (T - s - 1) + Σ_{k=1}^{W-1} (T - s - k - 1)``: the main trajectory's ``T``,
    plus every completion's steps except its first, which reuses the main trajectory's velocity
    (55 for ``T = 10, s = 0, W = 9``). Without branches: ``T``. With the ``branch_steps = m``
    approximation: ``T + Σ_{k=0}^{W-1} (min(m, T - s - k) - 1)``.
    """
    _check_window(num_steps, window_start, window_size)
    _check_branch_steps(branch_steps)
    if not branches:
        return num_steps
    completions = sum(
        _completion_steps(window_start + k, num_steps, branch_steps) - 1 for k in range(window_size)
    )
    return num_steps + completions


def sequential_nfe(
    num_steps: int, window_start: int, window_size: int, branches: bool = True, branch_steps: int | None = None
) -> int:
    """Velocity evaluations per image spent by `rollout_sequential` (the research schedule).

    Exact: ``T + T + Σ_{k=1}^{W-1} (T - s - k)``: main, baseline from ``x_0``, and every
    branch recomputed in full (64 for ``T = 10, s = 0, W = 9``). Without branches: ``T``. With
    the ``branch_steps = m`` approximation: ``T + s + Σ_{k=0}^{W-1} min(m, T - s - k)``.
    """
    _check_window(num_steps, window_start, window_size)
    _check_branch_steps(branch_steps)
    if not branches:
        return num_steps
    completions = sum(_completion_steps(window_start + k, num_steps, branch_steps) for k in range(window_size))
    return num_steps + window_start + completions


class _Evaluator:
    """Calls ``velocity_fn`` in chunks of at most ``max_batch`` latents and counts the work."""

    def __init__(self, velocity_fn: VelocityFn, max_batch: int | None):
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.velocity_fn = velocity_fn
        self.max_batch = max_batch
        self.calls = 0
        self.evaluations = 0

    def __call__(self, latents: Tensor, sigma: float, rows: Tensor) -> Tensor:
        """(N, C, h, w) latents at ``sigma`` with image indices ``rows`` (N,) -> (N, C, h, w) float32."""
        size = latents.shape[0] if self.max_batch is None else self.max_batch
        outputs = []
        for chunk, chunk_rows in zip(latents.split(size), rows.split(size), strict=True):
            velocity = self.velocity_fn(chunk, sigma, chunk_rows)
            if velocity.shape != chunk.shape:
                raise ValueError(f"velocity_fn returned {tuple(velocity.shape)} for latents {tuple(chunk.shape)}")
            outputs.append(velocity.float())
            self.calls += 1
            self.evaluations += chunk.shape[0]
        return torch.cat(outputs)


def _prepare(
    initial_latents: Tensor,
    sigmas: Tensor,
    window_start: int,
    window_size: int,
    branch_steps: int | None,
    generator: torch.Generator | None,
    step_noise: Tensor | None,
) -> tuple[Tensor, list[float], Tensor]:
    """Validate the inputs; return float32 latents, the sigmas as floats and the window noise.

    The noise is (B, W, C, h, w) standard normal: ``step_noise`` if given, else one draw from
    ``generator`` on the latents' device.
    """
    if initial_latents.ndim != 4:
        raise ValueError(f"initial_latents must be (B, C, h, w), got {tuple(initial_latents.shape)}")
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of T+1 >= 2 values, got shape {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing")
    _check_window(sigmas.shape[0] - 1, window_start, window_size)
    _check_branch_steps(branch_steps)
    latents = initial_latents.detach().float()
    batch, *sample_shape = latents.shape
    noise_shape = (batch, window_size, *sample_shape)
    if step_noise is None:
        step_noise = torch.randn(noise_shape, generator=generator, device=latents.device, dtype=torch.float32)
    elif tuple(step_noise.shape) != noise_shape:
        raise ValueError(f"step_noise must have shape {noise_shape}, got {tuple(step_noise.shape)}")
    return latents, [float(s) for s in sigmas], step_noise.to(device=latents.device, dtype=torch.float32)


@torch.no_grad()
def ode_sample(velocity_fn: VelocityFn, latents: Tensor, sigmas: Tensor, max_batch: int | None = None) -> Tensor:
    """Deterministic Euler sampling of (B, C, h, w) latents through all of ``sigmas`` (T+1,).

    Used for evaluation; ``rows`` passed to ``velocity_fn`` are ``0 … B-1``.
    """
    latents = latents.detach().float()
    rows = torch.arange(latents.shape[0], device=latents.device)
    values = [float(s) for s in sigmas]
    return _ode_solve(_Evaluator(velocity_fn, max_batch), latents, values, list(range(len(values))), rows)


def _ode_solve(evaluate: _Evaluator, latents: Tensor, sigmas: list[float], grid: list[int], rows: Tensor) -> Tensor:
    """ODE (Euler) steps through the sigma indices ``grid``, one velocity call per step."""
    for here, there in zip(grid[:-1], grid[1:]):
        velocity = evaluate(latents, sigmas[here], rows)
        latents = ode_step(velocity, latents, sigmas[here], sigmas[there])
    return latents


@torch.no_grad()
def rollout_sequential(
    velocity_fn: VelocityFn,
    initial_latents: Tensor,
    sigmas: Tensor,
    window_start: int,
    window_size: int,
    step: StepKind,
    branches: bool = True,
    generator: torch.Generator | None = None,
    step_noise: Tensor | None = None,
    branch_steps: int | None = None,
) -> Rollout:
    """Reference rollout, scheduled like the research code (see the module docstring).

    Args:
        velocity_fn: the model, ``(latents (N, C, h, w), sigma, rows (N,)) -> (N, C, h, w)``.
        initial_latents: (B, C, h, w) initial noise ``x_0``.
        sigmas: (T+1,) strictly decreasing noise levels.
        window_start, window_size: ``s`` and ``W``; needs ``0 <= s`` and ``s + W <= T``.
        step: the kind of stochastic step and its noise level ``a`` of spec §1 (`tpgrpo.maths.sde.step_kind`).
        branches: compute the baseline and branches (TP-GRPO) or only the main trajectory
            (Flow-GRPO's outcome credit).
        generator: draws the (B, W, C, h, w) window noise when ``step_noise`` is None.
        step_noise: (B, W, C, h, w) standard normal noise of the window steps.
        branch_steps: approximation, off by default: complete the baseline (from ``x_s``) and
            the branches with ``branch_steps`` ODE steps on a coarser grid (`completion_grid`).
            Ignored without branches.

    Costs `sequential_nfe` evaluations per image, one call of B latents per step.
    """
    latents, sigma_values, noise = _prepare(
        initial_latents, sigmas, window_start, window_size, branch_steps, generator, step_noise
    )
    num_steps, window_end = len(sigma_values) - 1, window_start + window_size
    rows = torch.arange(latents.shape[0], device=latents.device)
    evaluate = _Evaluator(velocity_fn, None)

    sample, states, log_probs = latents, [], []
    for j in range(num_steps):
        velocity = evaluate(sample, sigma_values[j], rows)
        if window_start <= j < window_end:
            states.append(sample)
            sample, log_prob, _ = sde_step(
                velocity, sample, sigma_values[j], sigma_values[j + 1], step,
                noise=noise[:, j - window_start],
            )
            log_probs.append(log_prob)
        else:
            sample = ode_step(velocity, sample, sigma_values[j], sigma_values[j + 1])
        if j + 1 == window_end:
            states.append(sample)
    finals = [sample]

    if branches:
        baseline_grid = list(range(window_start)) + completion_grid(window_start, num_steps, branch_steps)
        baseline = _ode_solve(evaluate, latents, sigma_values, baseline_grid, rows)
        completed = [
            _ode_solve(
                evaluate, states[k], sigma_values, completion_grid(window_start + k, num_steps, branch_steps), rows
            )
            for k in range(1, window_size)
        ]
        finals = [baseline, *completed, sample]

    return Rollout(
        sigmas=sigmas.to(device=latents.device, dtype=torch.float32),
        window_start=window_start,
        window_size=window_size,
        states=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        final_latents=torch.stack(finals, dim=1),
        nfe_per_image=evaluate.evaluations // latents.shape[0],
        transformer_calls=evaluate.calls,
        branch_steps=branch_steps if branches else None,
    )


@dataclass
class _Completion:
    """An ODE completion in flight: its slot ``k``, state (B, C, h, w) and remaining grid indices."""

    slot: int
    sample: Tensor
    grid: list[int]


@torch.no_grad()
def rollout(
    velocity_fn: VelocityFn,
    initial_latents: Tensor,
    sigmas: Tensor,
    window_start: int,
    window_size: int,
    step: StepKind,
    branches: bool = True,
    generator: torch.Generator | None = None,
    step_noise: Tensor | None = None,
    branch_steps: int | None = None,
    max_batch: int | None = None,
) -> Rollout:
    """The rollout engine: `rollout_sequential`'s results at the minimum number of evaluations.

    Arguments as in `rollout_sequential`, plus ``max_batch``: the most latents per
    ``velocity_fn`` call (None: all live trajectories of a timestep in one call).

    Per image it spends `minimum_nfe` evaluations,
    ``T + (T - s - 1) + Σ_{k=1}^{W-1} (T - s - k - 1)`` for an exact rollout with branches
    (55 for ``T = 10, s = 0, W = 9``, against 64 for the research schedule), ``T`` without:

    * the main trajectory evaluates every step ``j`` once (``T``);
    * completion ``k`` (``k = 0`` the baseline) leaves the main trajectory at ``x_{s+k}``; its
      first ODE step reuses the main trajectory's velocity there, so it costs its remaining
      steps minus one (the baseline's steps before the window are the main trajectory's own);
    * at step ``j`` the main state and every completion due at sigma index ``j`` are stacked
      into one batch of ``B·(1 + live)`` latents and evaluated together (in chunks of at most
      ``max_batch``).
    """
    latents, sigma_values, noise = _prepare(
        initial_latents, sigmas, window_start, window_size, branch_steps, generator, step_noise
    )
    num_steps, window_end = len(sigma_values) - 1, window_start + window_size
    batch = latents.shape[0]
    image_rows = torch.arange(batch, device=latents.device)
    evaluate = _Evaluator(velocity_fn, max_batch)

    def advance(completion: _Completion, velocity: Tensor) -> None:
        here, there = completion.grid[0], completion.grid[1]
        completion.sample = ode_step(velocity, completion.sample, sigma_values[here], sigma_values[there])
        completion.grid = completion.grid[1:]

    sample, states, log_probs = latents, [], []
    live: list[_Completion] = []
    finals: dict[int, Tensor] = {}
    for j in range(num_steps):
        due = [c for c in live if c.grid[0] == j]
        stacked = torch.cat([sample, *(c.sample for c in due)])
        velocities = evaluate(stacked, sigma_values[j], image_rows.repeat(1 + len(due))).split(batch)
        velocity = velocities[0]
        for completion, completion_velocity in zip(due, velocities[1:]):
            advance(completion, completion_velocity)

        if window_start <= j < window_end:
            if branches:
                leaving = _Completion(j - window_start, sample, completion_grid(j, num_steps, branch_steps))
                advance(leaving, velocity)
                live.append(leaving)
            states.append(sample)
            sample, log_prob, _ = sde_step(
                velocity, sample, sigma_values[j], sigma_values[j + 1], step,
                noise=noise[:, j - window_start],
            )
            log_probs.append(log_prob)
        else:
            sample = ode_step(velocity, sample, sigma_values[j], sigma_values[j + 1])
        if j + 1 == window_end:
            states.append(sample)

        finals.update({c.slot: c.sample for c in live if c.grid[0] == num_steps})
        live = [c for c in live if c.grid[0] < num_steps]

    finals[window_size if branches else 0] = sample
    return Rollout(
        sigmas=sigmas.to(device=latents.device, dtype=torch.float32),
        window_start=window_start,
        window_size=window_size,
        states=torch.stack(states, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        final_latents=torch.stack([finals[k] for k in sorted(finals)], dim=1),
        nfe_per_image=evaluate.evaluations // batch,
        transformer_calls=evaluate.calls,
        branch_steps=branch_steps if branches else None,
    )
