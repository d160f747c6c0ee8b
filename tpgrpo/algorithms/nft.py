"""DiffusionNFT (Zheng et al., 2025, arXiv:2509.16117): reinforcement on the forward process.

It needs neither log-probabilities nor trajectories, only each image's clean latents. Rewards
become group advantages A, clipped to ``±c`` and mapped to an optimality probability
``r = clip(A / c / 2 + 1/2, 0, 1)``. For a training time σ and fresh noise ε,
``x_σ = (1 − σ) x₀ + σ ε``. The current velocity ``v`` and the velocity ``v_old`` of the policy
that sampled the batch define an implicit positive policy ``v⁺ = β v + (1 − β) v_old`` and a
negative one ``v⁻ = (1 + β) v_old − β v``. The loss pulls ``v⁺``'s clean-image prediction
``x_σ − σ v⁺`` towards x₀ with weight r and ``v⁻``'s with weight 1 − r:

    loss = c · mean[(r ‖x̂⁺ − x₀‖²/w⁺ + (1 − r) ‖x̂⁻ − x₀‖²/w⁻) / β]

where ``w = mean |x̂ − x₀|`` (detached) is the reference code's adaptive weight, plus
``kl_beta · mean ‖v − v_ref‖²`` against the adapter-free model. Where ours differs from the reference
code (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py):

* the old policy is the one that sampled the batch (the reference keeps an EMA of the weights as
  its "old" adapter; a decay of 0 is ours), so ``v_old`` is computed while collecting, at the
  training times and noise drawn then;
* images are sampled with the configured SDE window (``model.sampling``), so a group's images differ
  even with the same initial noise; the reference samples with its own solver;
* rollouts and training use ``nft.guidance_scale``, 1 by default: the paper's CFG-free training
  (with a scale above 1 both use that guided velocity).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from tpgrpo.algorithms.base import FlowAlgorithm, PhaseTimer, register_algorithm, seed_for
from tpgrpo.errors import UserInputError
from tpgrpo.families import PromptEmbeds
from tpgrpo.lora import disabled_adapter
from tpgrpo.maths import credit as credit_rules
from tpgrpo.maths.rollout import rollout
from tpgrpo.settings import CreditConfig, NFTConfig


def optimality(advantages: Tensor, clip: float) -> Tensor:
    """DiffusionNFT's optimality probability r in [0, 1] of clipped advantages: A = ±clip gives 1 / 0."""
    return (advantages.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def clean_prediction_loss(prediction: Tensor, clean: Tensor) -> Tensor:
    """Per-sample ``mean (x̂ − x₀)² / w`` with the adaptive weight ``w = mean |x̂ − x₀|`` (detached, at least 1e-5): (M,)."""
    dims = tuple(range(1, clean.ndim))
    with torch.no_grad():
        weight = (prediction.double() - clean.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5).to(prediction.dtype)
    return ((prediction - clean) ** 2 / weight).mean(dim=dims)


def nft_loss(
    velocity: Tensor, old_velocity: Tensor, noisy: Tensor, clean: Tensor, sigma: Tensor, r: Tensor, beta: float
) -> Tensor:
    """Per-sample DiffusionNFT policy loss (M,) of velocities (M, ...) at ``noisy`` = x_σ, before the scale c."""
    sigma = sigma.view(-1, *([1] * (clean.ndim - 1)))
    positive = beta * velocity + (1 - beta) * old_velocity
    negative = (1 + beta) * old_velocity - beta * velocity
    positive_loss = clean_prediction_loss(noisy - sigma * positive, clean)
    negative_loss = clean_prediction_loss(noisy - sigma * negative, clean)
    return (r * positive_loss + (1 - r) * negative_loss) / beta


@dataclass(frozen=True)
class NFTBatch:
    """What one DiffusionNFT batch of ``N`` images trained at ``T`` times holds.

    Attributes:
        cond, prompts, group_ids, images: as in `tpgrpo.algorithms.grpo.RolloutBatch`.
        rewards: (N, 1) reward of each image; ``scores`` every score of the reward, likewise.
        advantages: (N, T) each image's clipped group advantage, the same at every training time.
        clean: (N, C, h, w) the sampled clean latents x₀.
        sigmas: (T,) the training times (the sampler's noise levels).
        noise: (N, T, C, h, w) the noise ε of each image and time.
        old_velocity: (N, T, C, h, w) the sampling policy's velocity at each x_σ.
        nfe_per_image: transformer evaluations per image (sampling and old velocities).
    """

    cond: PromptEmbeds
    prompts: list[str]
    group_ids: Tensor
    rewards: Tensor
    scores: dict[str, Tensor]
    advantages: Tensor
    images: Tensor
    clean: Tensor
    sigmas: Tensor
    noise: Tensor
    old_velocity: Tensor
    nfe_per_image: int

    def __len__(self) -> int:
        return self.group_ids.shape[0]

    @property
    def final_rewards(self) -> Tensor:
        return self.rewards[:, -1]

    def noisy(self, rows: Tensor, units: Tensor) -> Tensor:
        """x_σ of the pairs (rows[i], units[i])."""
        sigma = self.sigmas[units].view(-1, *([1] * (self.clean.ndim - 1)))
        return (1 - sigma) * self.clean[rows] + sigma * self.noise[rows, units]


@register_algorithm("diffusion-nft")
class DiffusionNFT(FlowAlgorithm):
    """DiffusionNFT on a flow model (module docstring).

    Args (beside `FlowAlgorithm`'s):
        credit: group advantages (``advantage_eps``, ``global_std``, ``advantage_clip``, which is
            also the scale c); ``credit.method`` does not apply.
        nft: ``beta``, the step from the old policy to the implicit ones (`tpgrpo.settings.NFTConfig`).
    """

    setting_groups = ("credit", "nft")

    def __init__(self, *args: Any, credit: CreditConfig = CreditConfig(), nft: NFTConfig = NFTConfig(), **kwargs: Any):
        super().__init__(*args, **kwargs)
        if credit.method is not None:
            raise UserInputError(f"credit.method applies to tp-grpo and flow-grpo, not diffusion-nft; got {credit.method!r}")
        self.credit = credit
        self.nft = nft

    def trained_units(self, batch: NFTBatch) -> list[int]:
        return list(range(batch.sigmas.numel()))

    def trained_rows(self, batch: NFTBatch) -> Tensor:
        """Every image: an advantage of 0 (r = 1/2) still pulls the policy towards the old one."""
        return torch.ones(len(batch), dtype=torch.bool, device=batch.group_ids.device)

    def training_noise(self, group_ids: Tensor, step: Any, times: int, shape: Sequence[int]) -> Tensor:
        """(N, T, C, h, w) noise of each image's training times, from the image's own seed."""
        groups, members = group_ids.tolist(), credit_rules.group_members(group_ids).tolist()
        noise = [
            torch.randn((times, *shape), generator=torch.Generator().manual_seed(seed_for(self.seed, step, group, member, "nft")))
            for group, member in zip(groups, members)
        ]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def collect(self, prompts: Sequence[str], metadata: Sequence[Mapping], group_ids: Tensor, step: Any) -> NFTBatch:
        """Sample, score, advantages, and the sampling policy's velocity at every training time."""
        sampling, credit, timer = self.sampling, self.credit, PhaseTimer(self.device)
        group_ids, window_start, initial_noise, step_noise, cond = self.start_rollout(prompts, group_ids, step, timer)
        velocity_fn = self.velocity_fn(cond, self.nft.guidance_scale)
        sigmas = self.flow.sigmas(sampling.num_steps, sampling.resolution).to(self.device)
        with self.sampling_mode(), timer("rollout"):
            result = rollout(
                velocity_fn, initial_noise, sigmas, window_start, sampling.window_size, sampling.step,
                branches=False, step_noise=step_noise, max_batch=sampling.rollout_max_batch,
            )
            clean = result.final_latents[:, -1]
            times = sigmas[:-1]
            noise = self.training_noise(group_ids, step, times.numel(), clean.shape[1:])
            rows = torch.arange(len(group_ids), device=self.device)
            old_velocity = torch.stack([
                velocity_fn((1 - sigma) * clean + sigma * noise[:, index], sigma, rows) for index, sigma in enumerate(times)
            ], dim=1)
        with timer("decode"):
            images = self.flow.decode(clean)
        with timer("reward"):
            scores = self.score(images, prompts, metadata, 1)
        with timer("credit"):
            advantages = credit_rules.group_advantages(
                scores["reward"], group_ids, eps=credit.advantage_eps, global_std=credit.global_std,
                clip=credit.advantage_clip,
            )
        self.timings = timer.seconds
        return NFTBatch(
            cond=cond, prompts=list(prompts), group_ids=group_ids, rewards=scores["reward"], scores=scores,
            advantages=advantages.expand(-1, times.numel()).contiguous(), images=images, clean=clean, sigmas=times,
            noise=noise, old_velocity=old_velocity, nfe_per_image=result.nfe_per_image + times.numel(),
        )

    def loss(self, batch: NFTBatch, rows: Tensor, units: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean DiffusionNFT loss (+ kl_beta · ‖v − v_ref‖²) over the pairs (``rows[i]``, ``units[i]``), one transformer call."""
        rows, units = rows.to(self.device), units.to(self.device)
        clip = self.credit.advantage_clip
        noisy, sigma = batch.noisy(rows, units), batch.sigmas[units]
        velocity_fn = self.velocity_fn(batch.cond, self.nft.guidance_scale)
        velocity = velocity_fn(noisy, sigma, rows)
        old_velocity = batch.old_velocity[rows, units]
        r = optimality(batch.advantages[rows, units], clip)
        loss = clip * nft_loss(velocity, old_velocity, noisy, batch.clean[rows], sigma, r, self.nft.beta).mean()
        metrics = {"old_deviation": ((velocity.detach() - old_velocity) ** 2).mean()}
        if self.update.kl_beta > 0:
            with torch.no_grad(), disabled_adapter(self.transformer):
                reference = velocity_fn(noisy, sigma, rows)
            kl = ((velocity - reference) ** 2).mean()
            loss = loss + self.update.kl_beta * kl
            metrics["kl"] = kl.detach()
        metrics["policy_loss"] = loss.detach()
        return loss, metrics
