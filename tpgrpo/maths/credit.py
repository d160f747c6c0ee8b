"""Credit assignment of TP-GRPO and Flow-GRPO, group advantages and the clipped policy loss.

Spec §3 and §4. Every function takes and returns tensors; nothing here knows about models.

Notation: ``rewards`` is (B, W+1), row b = ``R_0 … R_W`` of one image: ``R_0`` the reward of the
pure-ODE baseline, ``R_k`` of the image completed by ODE after k SDE steps, ``R_W`` of the final
image. ``d_t = R_{t+1} - R_t`` is the incremental reward of SDE step t (t = 0 … W-1) and
``Δ = R_W - R_0`` the trajectory's overall trend. ``sign(0) = 0`` throughout, so ties and
discrete rewards (GenEval, OCR) are handled exactly.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Assignment = tuple[Tensor, "Tensor | None"]  # step rewards (B, W) and the kept turning points, bool (B, W), or None


@dataclass(frozen=True)
class CreditRule:
    """A credit rule selectable by name (``credit.method``).

    ``assign(rewards, **options)`` gives the step rewards (B, W) and the turning points that got the
    long-term reward (bool (B, W); None for a rule without them). ``needs_branches``: the rule reads
    ``R_1 … R_{W-1}``, so rollouts complete a branch after every SDE step; without them ``rewards``
    is (B, 1), the final rewards. ``options``: the keyword options ``assign`` takes, by the names of
    ``credit.*`` settings (and ``num_steps``, the window size).
    """

    name: str
    assign: Callable[..., Assignment]
    needs_branches: bool
    options: tuple[str, ...]


CREDITS: dict[str, CreditRule] = {}


def register_credit(
    name: str, needs_branches: bool, options: Sequence[str] = ()
) -> Callable[[Callable[..., Assignment]], Callable[..., Assignment]]:
    """Decorator: make ``assign(rewards, **options) -> (step rewards, kept turning points)`` the rule ``name``."""

    def add(fn: Callable[..., Assignment]) -> Callable[..., Assignment]:
        CREDITS[name] = CreditRule(name, fn, needs_branches, tuple(options))
        return fn

    return add


def _check_rewards(rewards: Tensor) -> None:
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(
            f"rewards must have shape (B, W+1) with W >= 1 (R_0 ... R_W per row), got {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a float tensor, got {rewards.dtype}")


def incremental_rewards(rewards: Tensor) -> Tensor:
    """``d_t = R_{t+1} - R_t``: (B, W+1) -> (B, W)."""
    _check_rewards(rewards)
    return rewards[:, 1:] - rewards[:, :-1]


def raw_turning_points(rewards: Tensor) -> Tensor:
    """Turning-point indicator ``I_t`` of spec §3 before balancing: (B, W+1) -> bool (B, W).

    * t = 0: ``sign(d_0)·sign(R_W - R_1) > 0`` — the first step moves the way all later ones do.
    * t ≥ 1: ``s_{t-1} < 0`` and ``s_t > 0`` with ``s_t = sign(d_t)·sign(Δ)`` (the step flips a
      local trend that ran against the overall one) and ``sign(d_t)·sign(R_W - R_{t+1}) > 0``
      (the rest of the trajectory keeps going its way).

    The last step can never qualify (``R_W - R_W = 0``), nor can any step of a trajectory with
    ``Δ = 0``.
    """
    d = incremental_rewards(rewards)
    direction = torch.sign(d)
    trend = torch.sign(rewards[:, -1:] - rewards[:, :1])
    with_trend = direction * trend
    consistent = direction * torch.sign(rewards[:, -1:] - rewards[:, 1:]) > 0
    flips = torch.zeros_like(consistent)
    flips[:, 0] = True
    flips[:, 1:] = (with_trend[:, :-1] < 0) & (with_trend[:, 1:] > 0)
    return flips & consistent


def balance_turning_points(flags: Tensor, trend: Tensor) -> Tensor:
    """Keep as many turning points of rising trajectories as of falling ones.

    Args:
        flags: bool (B, W), turning points before balancing.
        trend: (B,), ``Δ = R_W - R_0`` of each row.

    Returns:
        bool (B, W). When flagged pairs occur on rows with Δ > 0 and on rows with Δ < 0, only
        ``m = min(#positive, #negative)`` pairs of each side are kept: those with the largest
        ``|Δ|``. Ties in ``|Δ|`` (several flagged steps of one row share its Δ, and discrete
        rewards make equal Δ common) are broken by order: lower row index first, then earlier
        step. When only one side (or neither) has flagged pairs, all are kept.
    """
    if flags.ndim != 2 or trend.shape != (flags.shape[0],):
        raise ValueError(f"flags must be (B, W) and trend (B,), got {tuple(flags.shape)} and {tuple(trend.shape)}")
    rows, steps = flags.nonzero(as_tuple=True)
    pair_trend = trend[rows]
    positive = pair_trend > 0
    negative = pair_trend < 0
    keep_count = min(int(positive.sum()), int(negative.sum()))
    if keep_count == 0:
        return flags.clone()
    kept = torch.zeros_like(flags)
    for side in (positive, negative):
        side_rows, side_steps = rows[side], steps[side]
        # pairs come out of nonzero() in (row, step) order; a stable sort keeps that order in ties
        order = torch.sort(pair_trend[side].abs(), descending=True, stable=True).indices[:keep_count]
        kept[side_rows[order], side_steps[order]] = True
    return kept


def turning_points(rewards: Tensor, balance: bool = True, balance_chunk: int | None = None) -> Tensor:
    """Turning points that receive the long-term reward: (B, W+1) -> bool (B, W).

    With ``balance``, they are balanced over all B rows, or, with ``balance_chunk`` = k, over each
    run of k consecutive rows separately (the last run may be shorter), as the research code
    balances each sampling mini-batch.
    """
    flags = raw_turning_points(rewards)
    if not balance:
        return flags
    if balance_chunk is not None and balance_chunk < 1:
        raise ValueError(f"balance_chunk must be >= 1 or None, got {balance_chunk}")
    trend = rewards[:, -1] - rewards[:, 0]
    chunk = balance_chunk or len(rewards)
    if chunk >= len(rewards):
        return balance_turning_points(flags, trend)
    parts = [balance_turning_points(flags[i : i + chunk], trend[i : i + chunk]) for i in range(0, len(rewards), chunk)]
    return torch.cat(parts)


@register_credit("tp", needs_branches=True, options=("eta", "balance", "balance_chunk"))
def turning_point_credit(
    rewards: Tensor, eta: float = 1.0, balance: bool = True, balance_chunk: int | None = None
) -> Assignment:
    """TP-GRPO per-step rewards (spec §3), (B, W+1) -> (B, W), and the kept turning points (B, W).

    ``r_t = η·(R_W - R_t)`` at kept turning points (see `turning_points`), ``d_t`` elsewhere.
    """
    kept = turning_points(rewards, balance=balance, balance_chunk=balance_chunk)
    long_term = eta * (rewards[:, -1:] - rewards[:, :-1])
    return torch.where(kept, long_term, incremental_rewards(rewards)), kept


def turning_point_rewards(
    rewards: Tensor, eta: float = 1.0, balance: bool = True, balance_chunk: int | None = None
) -> Tensor:
    """The step rewards of `turning_point_credit`: (B, W+1) -> (B, W)."""
    return turning_point_credit(rewards, eta, balance, balance_chunk)[0]


def outcome_rewards(final_rewards: Tensor, num_steps: int) -> Tensor:
    """Flow-GRPO credit: every one of ``num_steps`` steps gets the final reward. (B,) -> (B, num_steps)."""
    if final_rewards.ndim != 1:
        raise ValueError(f"final_rewards must have shape (B,), got {tuple(final_rewards.shape)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return final_rewards[:, None].expand(-1, num_steps).clone()


@register_credit("outcome", needs_branches=False, options=("num_steps",))
def _outcome_credit(rewards: Tensor, num_steps: int | None = None) -> Assignment:
    """Flow-GRPO credit (`_outcome_from_sequence`); it has no turning points."""
    return _outcome_from_sequence(rewards, num_steps), None


def _outcome_from_sequence(rewards: Tensor, num_steps: int | None = None) -> Tensor:
    """Outcome credit on a reward sequence: (B, W+1) -> (B, W), every step gets R_W.

    Outcome credit needs only the final reward: with ``num_steps`` (W) given, ``rewards`` may
    also be (B, 1), the final rewards of a rollout without branches.
    """
    if num_steps is not None and rewards.ndim == 2 and rewards.shape[1] == 1:
        return outcome_rewards(rewards[:, 0], num_steps)
    _check_rewards(rewards)
    if num_steps is not None and num_steps != rewards.shape[1] - 1:
        raise ValueError(f"num_steps ({num_steps}) does not match the rewards' W ({rewards.shape[1] - 1})")
    return outcome_rewards(rewards[:, -1], rewards.shape[1] - 1)


def step_rewards(credit: str, rewards: Tensor, **options) -> Tensor:
    """Per-step rewards (B, W) of the credit rule named ``credit`` ("tp" or "outcome")."""
    if credit not in CREDITS:
        raise ValueError(f"unknown credit {credit!r}; choose one of {sorted(CREDITS)}")
    return CREDITS[credit].assign(rewards, **options)[0]


def group_advantages(
    step_rewards: Tensor,
    group_ids: Tensor,
    eps: float = 1e-4,
    global_std: bool = False,
    clip: float | None = None,
) -> Tensor:
    """Group-relative advantages, each step column separately (spec §4).

    Args:
        step_rewards: (N, W) per-step rewards (or (N,) for a single column).
        group_ids: LongTensor (N,); rows with the same id share a prompt.
        eps: added to the standard deviation.
        global_std: divide by the std of the whole column instead of each group's.
        clip: if given, clamp the result to ``[-clip, clip]`` (the loss uses 5).

    Returns:
        Tensor shaped like ``step_rewards``: ``(r - mean_group(r)) / (std(r) + eps)`` with the
        population std (ddof 0). A group of one image gets advantage 0.
    """
    squeeze = step_rewards.ndim == 1
    rewards = step_rewards[:, None] if squeeze else step_rewards
    if rewards.ndim != 2:
        raise ValueError(f"step_rewards must be (N, W) or (N,), got {tuple(step_rewards.shape)}")
    if group_ids.shape != (rewards.shape[0],):
        raise ValueError(f"group_ids must have shape ({rewards.shape[0]},), got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point():
        raise ValueError("group_ids must be an integer tensor")
    rewards = rewards.float()
    _, index = torch.unique(group_ids, return_inverse=True)
    num_groups = int(index.max()) + 1 if index.numel() else 0
    index = index.to(rewards.device)
    counts = torch.zeros(num_groups, device=rewards.device).index_add_(0, index, torch.ones_like(index, dtype=torch.float32))
    sums = torch.zeros(num_groups, rewards.shape[1], device=rewards.device).index_add_(0, index, rewards)
    means = sums / counts[:, None]
    centred = rewards - means[index]
    if global_std:
        std = rewards.std(dim=0, unbiased=False, keepdim=True)
    else:
        squares = torch.zeros_like(sums).index_add_(0, index, centred**2)
        std = (squares / counts[:, None]).sqrt()[index]
    advantages = centred / (std + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return advantages[:, 0] if squeeze else advantages


def group_members(group_ids: Tensor) -> Tensor:
    """Each row's position among the rows of its group, in order of appearance: (N,) -> (N,) long."""
    seen: dict[int, int] = {}
    members = []
    for group in group_ids.tolist():
        members.append(seen.get(group, 0))
        seen[group] = members[-1] + 1
    return torch.tensor(members, dtype=torch.long, device=group_ids.device)


def round_robin_order(group_ids: Tensor) -> Tensor:
    """Row order that takes one image of each prompt group in turn: every group's first image (groups
    in order of appearance), then every group's second, ... (N,) -> (N,) long permutation.

    Consecutive runs of this order mix prompts, like the research code's sampling mini-batches,
    which its sampler fills with images of shuffled prompts.
    """
    return torch.sort(group_members(group_ids), stable=True).indices


def update_parts(group_ids: Tensor, parts: int) -> Tensor:
    """Which of ``parts`` optimizer steps trains each row: ``(group id + member) mod parts``, (N,) long.

    Every group is spread evenly over the parts, and the assignment depends only on the row's
    group id and member index, so the same image lands in the same part whatever the number of
    ranks the batch is split over.
    """
    return (group_ids + group_members(group_ids)) % parts


def active_rows(advantages: Tensor) -> Tensor:
    """Rows with a non-zero advantage at some step, (N, W) -> bool (N,); the others are dropped."""
    return (advantages != 0).any(dim=1)


PolicyLoss = Callable[..., tuple[Tensor, dict[str, Tensor]]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLoss], PolicyLoss]:
    """Decorator: make ``loss(log_prob_new, log_prob_old, advantages, clip_range, advantage_clip) ->
    (loss, metrics)`` the policy loss ``name`` of the GRPO algorithms (``update.policy_loss``)."""

    def add(fn: PolicyLoss) -> PolicyLoss:
        POLICY_LOSSES[name] = fn
        return fn

    return add


@register_policy_loss("ppo-clip")
def clipped_policy_loss(
    log_prob_new: Tensor,
    log_prob_old: Tensor,
    advantages: Tensor,
    clip_range: float,
    advantage_clip: float | None = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip loss of spec §4, averaged over the batch.

    ``loss = mean(max(-A·ratio, -A·clip(ratio, 1-ε, 1+ε)))`` with ``ratio = exp(new - old)``
    and ``A`` clamped to ``±advantage_clip``. All inputs (B,). Returns the loss and metrics:
    ``clip_frac`` (share of samples where the clip is active), ``ratio_mean``, ``ratio_max``,
    ``ratio_min`` (all detached).
    """
    if not (log_prob_new.shape == log_prob_old.shape == advantages.shape) or log_prob_new.ndim != 1:
        raise ValueError(
            "log_prob_new, log_prob_old and advantages must all have shape (B,), got "
            f"{tuple(log_prob_new.shape)}, {tuple(log_prob_old.shape)}, {tuple(advantages.shape)}"
        )
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    if advantage_clip is not None:
        advantages = advantages.clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(log_prob_new.float() - log_prob_old.float())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    detached = ratio.detach()
    metrics = {
        "clip_frac": ((detached - 1.0).abs() > clip_range).float().mean(),
        "ratio_mean": detached.mean(),
        "ratio_min": detached.min(),
        "ratio_max": detached.max(),
    }
    return loss, metrics
