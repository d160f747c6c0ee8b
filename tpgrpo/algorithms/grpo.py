"""GRPO on the SDE window of a flow model: TP-GRPO (turning-point credit) and Flow-GRPO (outcome credit).

`GRPO.collect` turns prompts into a `RolloutBatch`: rollouts (`tpgrpo.maths.rollout`), decoding,
rewards, credit (`tpgrpo.maths.credit`'s registry) and advantages, clipped once. `GRPO.loss` gives the
clipped policy loss (+ β·KL) of any (image, transition) pairs of that batch in one transformer
call, each pair at its own sigma. The two algorithms differ only in their credit rule, so they are
one class registered twice.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from tpgrpo.algorithms.base import FlowAlgorithm, PhaseTimer, register_algorithm
from tpgrpo.families import PromptEmbeds
from tpgrpo.lora import disabled_adapter
from tpgrpo.maths import credit as credit_rules
from tpgrpo.maths.rollout import Rollout, rollout
from tpgrpo.maths.sde import kl_to_reference, sde_step
from tpgrpo.settings import CreditConfig


@dataclass(frozen=True)
class RolloutBatch:
    """What one rollout batch of ``N`` images with an SDE window of ``W`` steps produced.

    Attributes:
        rollout: trajectories, stored transitions and their log-probs (`tpgrpo.maths.rollout.Rollout`).
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

    @property
    def nfe_per_image(self) -> int:
        return self.rollout.nfe_per_image

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


@register_algorithm("tp-grpo", default_credit="tp")
@register_algorithm("flow-grpo", default_credit="outcome")
class GRPO(FlowAlgorithm):
    """Collects rollout batches of a flow model and gives the GRPO loss of their window transitions.

    Args (beside `FlowAlgorithm`'s):
        credit: the credit settings (`tpgrpo.settings.CreditConfig`); ``credit.method`` None takes
            ``default_credit``, the registered entry's rule ("tp" for tp-grpo, "outcome" for flow-grpo).
    """

    setting_groups = ("credit",)

    def __init__(self, *args: Any, credit: CreditConfig = CreditConfig(), default_credit: str = "tp", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.credit = credit
        self.rule = credit_rules.CREDITS[credit.method or default_credit]

    def trained_units(self, batch: RolloutBatch) -> list[int]:
        """The one place that decides which window transitions are trained: all of them."""
        return list(range(batch.rollout.window_size))

    # ------------------------------------------------------------------------------ collect
    def credit_and_advantages(self, sequence: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-step rewards and advantages (N, W) of this rank's images from their rewards (N, W+1),
        and the turning points that got the long-term reward (bool (N, W); None for outcome credit).

        Turning points are balanced over this rank's batch (spec §3), with ``balance_scope="global"``
        over all ranks' batches, with ``"minibatch"`` over each ``balance_minibatch`` images of this
        rank's batch taken one per prompt group in turn (`tpgrpo.maths.credit.round_robin_order`);
        ``global_std`` divides by the std of all ranks' step rewards. Groups are never split over
        ranks (`tpgrpo.training.data.GroupSampler`).
        """
        credit, comm = self.credit, self.comm()
        own = slice(comm.rank * len(group_ids), (comm.rank + 1) * len(group_ids))
        shared = comm.world_size > 1
        rows = comm.gather_rows(sequence) if credit.balance_scope == "global" and shared else sequence
        # mini-batches of mixed prompts: balance over runs of the rows in round-robin order over the groups
        order = credit_rules.round_robin_order(group_ids) if credit.balance_scope == "minibatch" else None
        if order is not None:
            rows = rows[order]
        rule = self.rule
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
        group_ids, window_start, initial_noise, step_noise, cond = self.start_rollout(prompts, group_ids, step, timer)
        with self.sampling_mode(), timer("rollout"):
            result = rollout(
                self.velocity_fn(cond, sampling.guidance_scale),
                initial_noise,
                self.flow.sigmas(sampling.num_steps, sampling.resolution).to(self.device),
                window_start,
                sampling.window_size,
                sampling.step,
                branches=self.rule.needs_branches,
                step_noise=step_noise,
                branch_steps=self.credit.branch_steps,
                max_batch=sampling.rollout_max_batch,
            )
        num_images, completions = result.final_latents.shape[:2]
        with timer("decode"):
            images = self.flow.decode(result.final_latents.flatten(0, 1))
        with timer("reward"):
            scores = self.score(images, prompts, metadata, completions)
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
        result, sampling, step = batch.rollout, self.sampling, self.sampling.step
        rows, transitions = rows.to(self.device), transitions.to(self.device)
        sigma = result.trained_sigmas.to(self.device)[transitions]
        sigma_next = result.trained_sigmas_next.to(self.device)[transitions]
        sample, taken = result.states[rows, transitions], result.states[rows, transitions + 1]
        old_log_prob = result.log_probs[rows, transitions]
        velocity_fn = self.velocity_fn(batch.cond, sampling.guidance_scale)
        velocity = velocity_fn(sample, sigma, rows)
        _, log_prob, mean = sde_step(velocity, sample, sigma, sigma_next, step, prev_sample=taken)
        loss, metrics = credit_rules.POLICY_LOSSES[self.update.policy_loss](
            log_prob, old_log_prob, batch.advantages[rows, transitions], self.update.clip_range, advantage_clip=None
        )  # the advantages were clipped once, in `credit_and_advantages`
        if self.update.kl_beta > 0:
            with torch.no_grad(), disabled_adapter(self.transformer):
                reference_velocity = velocity_fn(sample, sigma, rows)
            _, _, reference_mean = sde_step(
                reference_velocity, sample, sigma, sigma_next, step, prev_sample=taken
            )
            std = step.std(sigma, sigma_next)
            kl = kl_to_reference(mean, reference_mean, std).mean()
            loss = loss + self.update.kl_beta * kl
            metrics["kl"] = kl.detach()
        metrics["policy_loss"] = loss.detach()
        metrics["log_prob_diff"] = (log_prob.detach() - old_log_prob).abs().max()
        return loss, metrics

