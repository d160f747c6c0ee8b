"""The training metrics of one batch, as a pure function of what the step produced."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from tpgrpo.maths import credit as credit_rules


def training_metrics(
    batch,
    update: Mapping[str, float],
    seconds: float,
    timings: Mapping[str, float],
    world_size: int,
    learning_rate: float,
) -> dict[str, Tensor]:
    """``train/*``, ``time/*`` and ``per_step/*`` values of a batch (`tpgrpo.algorithms.Batch`).

    ``update``: the update's averaged metrics; ``seconds``: the whole step's wall time on this rank;
    ``timings``: seconds per phase. Turning-point and step-reward figures appear for the algorithms
    whose batches have them (GRPO's `RolloutBatch`).
    """
    final = batch.rewards[:, -1]
    metrics = {
        "train/reward_mean": final.mean(),
        "train/reward_std": final.std(unbiased=False),
        "train/images_per_second": torch.tensor(final.numel() / seconds * world_size),  # all ranks
        "train/lr": torch.tensor(learning_rate),
        "train/nfe_per_image": torch.tensor(float(batch.nfe_per_image)),
    }
    for key, value in batch.scores.items():
        if key != "reward":
            metrics[f"train/{key}"] = value[:, -1].float().nanmean()
    metrics.update({f"train/{key}": torch.tensor(value) for key, value in update.items()})
    metrics.update({f"time/{phase}_seconds": torch.tensor(value) for phase, value in timings.items()})
    kept = getattr(batch, "turning_points", None)
    if kept is not None:
        sequence = batch.rewards
        raw = credit_rules.raw_turning_points(sequence)
        metrics["train/turning_points_kept"] = kept.float().sum()
        metrics["train/turning_points_dropped"] = (raw & ~kept).float().sum()
        for k in range(sequence.shape[1]):
            metrics[f"per_step/R_{k}"] = sequence[:, k].mean()
        for t in range(kept.shape[1]):
            metrics[f"per_step/turning_point_rate_{t}"] = kept[:, t].float().mean()
    step_rewards = getattr(batch, "step_rewards", None)
    for t in range(batch.advantages.shape[1]):
        metrics[f"per_step/advantage_abs_mean_{t}"] = batch.advantages[:, t].abs().mean()
        if step_rewards is not None:
            metrics[f"per_step/step_reward_mean_{t}"] = step_rewards[:, t].mean()
    return metrics
