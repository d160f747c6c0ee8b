"""One GRPO step of a flow model, apart from any trainer.

`GRPOStep.collect` turns prompts into a `RolloutBatch`: rollouts (`tpgrpo.rollout`), decoding,
rewards, credit (`tpgrpo.credit`'s registry) and advantages, clipped once. `GRPOStep.loss` gives
the clipped policy loss (+ β·KL) of any (image, transition) pairs of that batch in one transformer
call, each pair at its own sigma. The LightningModule adds only what a trainer does (optimizer
steps, gradient clipping, logging); `tpgrpo.diagnostics` and the benchmarks call the same two
methods, so what they measure is what trains.

What several processes share goes through `tpgrpo.distributed.Collectives`, passed in: the
default reads ``torch.distributed`` (one process when it is not initialised), and a test can pass
its own.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from tpgrpo import credit as credit_rules
from tpgrpo.distributed import Collectives
from tpgrpo.lora import disabled_adapter
from tpgrpo.families import FlowModel, PromptEmbeds
from tpgrpo.prompt_length import PromptLengthCheck
from tpgrpo.rollout import Rollout, VelocityFn, rollout, sample_window_start
from tpgrpo.sde import kl_to_reference, sde_step, step_std
from tpgrpo.settings import CreditConfig, SamplingConfig, UpdateConfig


def seed_for(*parts: Any) -> int:
    """A reproducible 63-bit seed from any values (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


@dataclass(frozen=True)
class RolloutBatch:
    """What one rollout batch of ``N`` images with an SDE window of ``W`` steps produced.

    Attributes:
        rollout: trajectories, stored transitions and their log-probs (`tpgrpo.rollout.Rollout`).
        cond: text conditioning, one row per image.
        prompts: the prompt of each image.
        group_ids: (N,) long; images of a group share a prompt.
        rewards: (N, W+1) total reward of each completion (0: the pure-ODE baseline, W: the
            main trajectory; only W for outcome credit, then (N, 1)).
        scores: every score the reward reports, each shaped like ``rewards``.
        step_rewards: (N, W) per-step rewards of the credit rule.
        advantages: (N, W) group-relative advantages, clipped.
        turning_points: bool (N, W) turning points that got the long-term reward (the ones that
            train); None for outcome credit.
        images: (N, 3, H, W) final images of the main trajectories, in [0, 1].
    """

    rollout: Rollout
    cond: PromptEmbeds
    prompts: list[str]
    group_ids: Tensor
    rewards: Tensor
    scores: dict[str, Tensor]
    step_rewards: Tensor
    advantages: Tensor
    turning_points: Tensor | None
    images: Tensor

    def __len__(self) -> int:
        return self.group_ids.shape[0]

    @property
    def final_rewards(self) -> Tensor:
        """(N,) reward of each main trajectory's image."""
        return self.rewards[:, -1]

    def with_advantages(self, advantages: Tensor) -> RolloutBatch:
        """The same batch with other (N, W) advantages (e.g. shuffled, for a noise floor)."""
        if advantages.shape != self.advantages.shape:
            raise ValueError(f"advantages must have shape {tuple(self.advantages.shape)}, got {tuple(advantages.shape)}")
        return replace(self, advantages=advantages)


class PhaseTimer:
    """Wall-clock seconds of named phases (``with timer("rollout"): ...``), accumulated in ``seconds``.

    On CUDA it synchronises before reading the clock, so a phase's kernels count in that phase.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = self._now()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + self._now() - started


def transition_pairs(rows: Tensor, transitions: Sequence[int]) -> tuple[Tensor, Tensor]:
    """All (image, transition) pairs of ``rows`` and ``transitions``, transition-major: (M,), (M,)."""
    rows = rows.flatten()
    index = torch.as_tensor(list(transitions), dtype=torch.long, device=rows.device)
    return rows.repeat(len(index)), index.repeat_interleave(rows.numel())


class GRPOStep:
    """Collects rollout batches of a flow model and gives the GRPO loss of their transitions.

    Args:
        flow: the frozen pipeline (`tpgrpo.families.FlowModel`).
        transformer: the transformer to roll out and train (LoRA-wrapped, possibly sharded).
        reward: ``reward(images, prompts, metadata) -> {"reward": (N,), ...}``.
        sampling, credit, update: the settings groups (`tpgrpo.settings`).
        seed: base seed of rollout noise and window draws.
        collectives: cross-rank operations; None reads ``torch.distributed`` at each call.
    """

    def __init__(
        self,
        flow: FlowModel,
        transformer: nn.Module,
        reward: Callable[..., dict[str, Tensor]],
        sampling: SamplingConfig,
        credit: CreditConfig,
        update: UpdateConfig,
        seed: int = 0,
        collectives: Collectives | None = None,
    ):
        self.flow = flow
        self.transformer = transformer
        self.reward = reward
        self.sampling = sampling
        self.credit = credit
        self.update = update
        self.seed = seed
        self.collectives = collectives
        self._prompt_length_check: PromptLengthCheck | None = None
        self.timings: dict[str, float] = {}  # seconds per phase of the last `collect`

    @property
    def device(self) -> torch.device:
        return self.flow.device

    def comm(self) -> Collectives:
        """The collectives in use: the ones passed in, else those of ``torch.distributed``."""
        return self.collectives or Collectives.from_process_group(self.device)

    # ------------------------------------------------------------------------------ model pieces
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Text embeddings (N rows), each distinct prompt encoded once; over-long prompts warn once per run."""
        if self._prompt_length_check is None:
            flow = self.flow
            self._prompt_length_check = PromptLengthCheck(flow.pipe, flow.max_sequence_length, flow.sequence_tokenizers)
        with self._prompt_length_check(prompts):
            return self.flow.encode(list(prompts))

    def velocity_fn(self, cond: PromptEmbeds, guidance: float, uncond: PromptEmbeds | None = None) -> VelocityFn:
        """The rollout's ``velocity_fn(latents, sigma, rows)`` for the current policy (CFG inside;
        ``uncond``: the unconditional rows, default the empty prompt's)."""

        def velocity(latents: Tensor, sigma: float | Tensor, rows: Tensor) -> Tensor:
            negative = uncond.index(rows) if uncond is not None else None
            return self.flow.velocity(
                latents, sigma, cond.index(rows), guidance_scale=guidance, uncond=negative, transformer=self.transformer
            )

        return velocity

    def rollout_noise(self, group_ids: Tensor, step: Any) -> tuple[Tensor, Tensor]:
        """Initial (N, C, h, w) and SDE-window (N, W, C, h, w) noise of a rollout batch.

        Each image draws from its own seed ``(seed, step, group id, member)`` (the initial noise
        from ``(seed, step, group id)`` with ``same_noise_per_group``), so an image gets the same
        noise whichever rank or batch position it has: seeds differ per rank, runs are reproducible,
        and N ranks compute what one process computes on the union of their batches.
        """
        shape = self.flow.latent_shape(self.sampling.resolution)
        groups, members = group_ids.tolist(), credit_rules.group_members(group_ids).tolist()
        initial, window = [], []
        for group, member in zip(groups, members):
            generator = torch.Generator().manual_seed(seed_for(self.seed, step, group, member))
            if self.sampling.same_noise_per_group:
                initial.append(torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(self.seed, step, group))))
            else:
                initial.append(torch.randn(shape, generator=generator))
            window.append(torch.randn((self.sampling.window_size, *shape), generator=generator))
        return torch.stack(initial).to(self.device), torch.stack(window).to(self.device)

    def trained_transitions(self, result: Rollout) -> list[int]:
        """The one place that decides which window transitions are trained: all of them."""
        return list(range(result.window_size))

    # ------------------------------------------------------------------------------ collect
    def credit_and_advantages(self, sequence: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-step rewards and advantages (N, W) of this rank's images from their rewards (N, W+1),
        and the turning points that got the long-term reward (bool (N, W); None for outcome credit).

        Turning points are balanced over this rank's batch (spec §3), with ``balance_scope="global"``
        over all ranks' batches, with ``"minibatch"`` over each ``balance_minibatch`` images of this
        rank's batch taken one per prompt group in turn (`tpgrpo.credit.round_robin_order`);
        ``global_std`` divides by the std of all ranks' step rewards. Groups are never split over
        ranks (`tpgrpo.data.GroupSampler`).
        """
        credit, comm = self.credit, self.comm()
        own = slice(comm.rank * len(group_ids), (comm.rank + 1) * len(group_ids))
        shared = comm.world_size > 1
        rows = comm.gather_rows(sequence) if credit.balance_scope == "global" and shared else sequence
        # mini-batches of mixed prompts: balance over runs of the rows in round-robin order over the groups
        order = credit_rules.round_robin_order(group_ids) if credit.balance_scope == "minibatch" else None
        if order is not None:
            rows = rows[order]
        rule = credit_rules.CREDITS[credit.method]
        settings = {
            "eta": credit.eta, "balance": credit.balance, "balance_chunk": credit.balance_minibatch,
            "num_steps": self.sampling.window_size,
        }
        per_step, kept = rule.assign(rows, **{name: settings[name] for name in rule.options})
        if order is not None:
            restore = torch.argsort(order)
            per_step, kept = per_step[restore], kept[restore] if kept is not None else None
        elif rows is not sequence:
            per_step, kept = per_step[own], kept[own] if kept is not None else None
        if credit.global_std and shared:
            advantages = credit_rules.group_advantages(
                comm.gather_rows(per_step), comm.gather_rows(group_ids), eps=credit.advantage_eps, global_std=True,
                clip=credit.advantage_clip,
            )[own]
        else:
            advantages = credit_rules.group_advantages(
                per_step, group_ids, eps=credit.advantage_eps, global_std=credit.global_std, clip=credit.advantage_clip
            )
        return per_step, advantages, kept

    @torch.no_grad()
    def collect(self, prompts: Sequence[str], metadata: Sequence[Mapping], group_ids: Tensor, step: Any) -> RolloutBatch:
        """Rollout, rewards, credit and advantages of one batch (prompts repeated per group member).

        ``step`` (any hashable value) seeds the rollout noise together with ``seed``. The seconds
        of each phase (``encode``, ``rollout``, ``decode``, ``reward``, ``credit``) are left in
        ``timings``.
        """
        sampling, timer = self.sampling, PhaseTimer(self.device)
        group_ids = group_ids.to(self.device)
        # the same window on every rank: ranks must make the same transformer calls (see tpgrpo.distributed)
        window_start = sample_window_start(
            sampling.num_steps, sampling.window_size, sampling.window_range, torch.Generator().manual_seed(seed_for(self.seed, step))
        )
        initial_noise, step_noise = self.rollout_noise(group_ids, step)
        with timer("encode"):
            cond = self.encode(prompts)
        was_training = self.transformer.training
        self.transformer.eval()
        with timer("rollout"):
            result = rollout(
                self.velocity_fn(cond, sampling.guidance_scale),
                initial_noise,
                self.flow.sigmas(sampling.num_steps, sampling.resolution).to(self.device),
                window_start,
                sampling.window_size,
                sampling.noise_level,
                kind=sampling.step_kind,
                branches=credit_rules.CREDITS[self.credit.method].needs_branches,
                step_noise=step_noise,
                branch_steps=self.credit.branch_steps,
                max_batch=sampling.rollout_max_batch,
            )
        self.transformer.train(was_training)
        num_images, completions = result.final_latents.shape[:2]
        with timer("decode"):
            images = self.flow.decode(result.final_latents.flatten(0, 1))
        with timer("reward"):
            scores = self.reward(
                images, [p for p in prompts for _ in range(completions)], [m for m in metadata for _ in range(completions)]
            )
        scores = {key: value.view(num_images, completions) for key, value in scores.items()}
        with timer("credit"):
            per_step, advantages, kept = self.credit_and_advantages(scores["reward"], group_ids)
        self.timings = timer.seconds
        return RolloutBatch(
            rollout=result,
            cond=cond,
            prompts=list(prompts),
            group_ids=group_ids,
            rewards=scores["reward"],
            scores=scores,
            step_rewards=per_step,
            advantages=advantages,
            turning_points=kept,
            images=images.view(num_images, completions, *images.shape[1:])[:, -1],
        )

    # ------------------------------------------------------------------------------ loss
    def loss(self, batch: RolloutBatch, rows: Tensor, transitions: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean clipped policy loss (+ β·KL) over the pairs (``rows[i]``, ``transitions[i]``).

        One transformer call for all pairs (each at its transition's sigma; a CFG pair in the
        same call), and one more without the adapter for the KL reference when ``kl_beta > 0``.
        Returns the loss and detached metrics (ratio statistics, clip fraction, KL,
        ``log_prob_diff``: the largest |new - old| log-prob, 0 where rollout and update agree).
        """
        result, sampling = batch.rollout, self.sampling
        rows, transitions = rows.to(self.device), transitions.to(self.device)
        sigma = result.trained_sigmas.to(self.device)[transitions]
        sigma_next = result.trained_sigmas_next.to(self.device)[transitions]
        sample, taken = result.states[rows, transitions], result.states[rows, transitions + 1]
        old_log_prob = result.log_probs[rows, transitions]
        velocity_fn = self.velocity_fn(batch.cond, sampling.guidance_scale)
        velocity = velocity_fn(sample, sigma, rows)
        _, log_prob, mean = sde_step(velocity, sample, sigma, sigma_next, sampling.noise_level, sampling.step_kind, prev_sample=taken)
        loss, metrics = credit_rules.clipped_policy_loss(
            log_prob, old_log_prob, batch.advantages[rows, transitions], self.update.clip_range, advantage_clip=None
        )  # the advantages were clipped once, in `credit_and_advantages`
        if self.update.kl_beta > 0:
            with torch.no_grad(), disabled_adapter(self.transformer):
                reference_velocity = velocity_fn(sample, sigma, rows)
            _, _, reference_mean = sde_step(
                reference_velocity, sample, sigma, sigma_next, sampling.noise_level, sampling.step_kind, prev_sample=taken
            )
            std = step_std(sigma, sigma_next, sampling.noise_level, sampling.step_kind)
            kl = kl_to_reference(mean, reference_mean, std).mean()
            loss = loss + self.update.kl_beta * kl
            metrics["kl"] = kl.detach()
        metrics["policy_loss"] = loss.detach()
        metrics["log_prob_diff"] = (log_prob.detach() - old_log_prob).abs().max()
        return loss, metrics

    def loss_calls(self, rows: Tensor, transitions: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        """The (rows, transitions) pairs of a micro-batch, split into transformer calls of at most
        ``update.max_latents_per_call`` latents (None: one call)."""
        pair_rows, pair_transitions = transition_pairs(rows, transitions)
        limit = self.update.max_latents_per_call or max(pair_rows.numel(), 1)
        return list(zip(pair_rows.split(limit), pair_transitions.split(limit)))
