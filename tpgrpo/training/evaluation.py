"""Evaluation apart from the module: deterministic samples, per-image results and their summaries.

`sample` draws the ODE samples that validation, test and predict score; `summarise_over_ranks`
computes what needs every rank's images (standard errors, each reward's summary);
`mean_and_stderr` is the one place that computes a mean with its standard error; `EvalResults`
is the callback that hands each evaluation's per-image scores to whoever asks (the demo, the
held-out curve, notebooks) as an explicit `EvalResult`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch import Callback
from torch import Tensor

from tpgrpo.maths.rollout import ode_sample

if TYPE_CHECKING:
    from tpgrpo.algorithms import FlowAlgorithm
    from tpgrpo.distributed import Collectives


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor, ignoring NaN (checks that do not apply).

    The standard error is the sample standard deviation (ddof 1) over the square root of the count;
    NaN with fewer than two values.
    """
    values = torch.as_tensor(values).double().flatten()
    values = values[~values.isnan()]
    if values.numel() < 2:
        return float(values.mean()) if values.numel() else math.nan, math.nan
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


@torch.no_grad()
def sample(step: FlowAlgorithm, prompts: Sequence[str], seeds: Tensor, num_steps: int, guidance_scale: float) -> Tensor:
    """Deterministic ODE samples (N, 3, H, W) in [0, 1] of the current policy, one per prompt and seed.

    Image ``i`` starts from the noise of seed ``seeds[i]`` alone, so it does not depend on the
    batch it is drawn in.
    """
    flow, resolution = step.flow, step.sampling.resolution
    noise = torch.stack(
        [flow.initial_noise(1, resolution, torch.Generator().manual_seed(int(seed)))[0] for seed in seeds]
    ).to(step.device)
    velocity_fn = step.velocity_fn(step.encode(prompts), guidance_scale)
    sigmas = flow.sigmas(num_steps, resolution)
    return flow.decode(ode_sample(velocity_fn, noise, sigmas, step.sampling.rollout_max_batch))


@dataclass
class EvalSummary:
    """What one evaluation gives over all ranks' images: the standard error of the mean of each
    summarised score, and the rewards' own summaries (`tpgrpo.rewards.Reward.summarise`)."""

    stderrs: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, float] = field(default_factory=dict)


def _gathered(batches: Sequence[dict[str, Tensor]], key: str, comm: Collectives) -> Tensor:
    """Every rank's per-image values of ``key``; ranks may hold different numbers of images, so they
    are gathered padded with NaN to the largest count (NaN is ignored downstream)."""
    parts = [b[key] for b in batches if key in b]
    local = torch.cat(parts).float() if parts else torch.zeros(0)
    length = int(comm.max(local.numel()))
    padded = torch.full((length,), math.nan)
    padded[: local.numel()] = local
    return comm.gather_rows(padded) if length else padded


class MeansOverRanks(Mapping):
    """The mean over all ranks' images of each score, computed when a key is asked for (NaN, a check
    that does not apply, ignored; NaN where no image has a value).

    Each first lookup of a key is a collective: every rank must ask for the same keys in the same
    order, which rewards do, as their `tpgrpo.rewards.Reward.summarise` depends on their settings
    only. A score a rank lacks (no real images in its batches) counts there as no images.
    """

    def __init__(self, batches: Sequence[dict[str, Tensor]], comm: Collectives):
        self.batches, self.comm = batches, comm
        self._means: dict[str, float] = {}

    def __getitem__(self, key: str) -> float:
        if key not in self._means:
            parts = [b[key] for b in self.batches if key in b]
            values = torch.cat(parts).float() if parts else torch.zeros(0)
            applicable = values[~values.isnan()]
            total, count = self.comm.sum(float(applicable.sum())), self.comm.sum(float(applicable.numel()))
            self._means[key] = total / count if count else math.nan
        return self._means[key]

    def __iter__(self):
        return iter(sorted({key for batch in self.batches for key in batch}))

    def __len__(self) -> int:
        return len({key for batch in self.batches for key in batch})


def summarise_over_ranks(
    batches: Sequence[dict[str, Tensor]],
    comm: Collectives,
    stderr_keys: Sequence[str] = ("reward",),
    summarise: Callable[[Mapping[str, float]], dict[str, float]] | None = None,
) -> EvalSummary:
    """The standard error of the mean of each of ``stderr_keys`` over all ranks' images (0 with a
    single image), and ``summarise`` of the means over all ranks of the scores (`MeansOverRanks`).

    ``batches``: this rank's per-image scores of each evaluation batch (each (M,), NaN where a
    check does not apply). Every rank must call this with the same keys (it gathers).
    """
    summary = EvalSummary()
    for key in stderr_keys:
        values = _gathered(batches, key, comm)
        if values.numel():
            _, stderr = mean_and_stderr(values)
            summary.stderrs[key] = 0.0 if math.isnan(stderr) else stderr
    if summarise is not None:
        summary.summaries = summarise(MeansOverRanks(batches, comm))
    return summary



class Evaluator:
    """The scores of an evaluation (validation or test): the training reward's and, beside them, those
    of the evaluation rewards (``{name: options}``; built at the first evaluation and held here, out
    of the module tree: no accelerator memory while only training, no sharding, nothing in
    checkpoints). `start` begins an evaluation, `score` scores a batch of images, `finish` summarises
    all ranks' scores (`summarise_over_ranks`)."""

    def __init__(self, reward: Any, eval_reward_options: Mapping[str, Mapping[str, Any]], build: Callable[[Mapping], Any]):
        self.reward = reward
        self.options = dict(eval_reward_options)
        self._build = build
        self.watched: Any = None
        self.scores: list[dict[str, Tensor]] = []

    def start(self) -> None:
        self.scores = []
        if self.options and self.watched is None:
            self.watched = self._build(self.options)

    def score(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]) -> dict[str, Tensor]:
        """Per-image scores (float, on the CPU) of a batch's real rows, kept for `finish`."""
        scores = {k: v.float().cpu() for k, v in self.reward(images, prompts, metadata).items()} if prompts else {}
        if prompts and self.watched is not None:
            scores.update({k: v.float().cpu() for k, v in self.watched(images, prompts, metadata).items() if k != "reward"})
        self.scores.append(scores)
        return scores

    def finish(self, comm: Collectives) -> EvalSummary:
        """Standard errors of the reward and of each evaluation reward, and every reward's own summary."""
        rewards = [self.reward, *([self.watched] if self.watched is not None else [])]

        def summarise(means: Mapping[str, float]) -> dict[str, float]:
            return {key: value for reward in rewards for key, value in reward.summarise(means).items()}

        return summarise_over_ranks(self.scores, comm, ["reward", *self.options], summarise)

@dataclass
class EvalResult:
    """One evaluation's per-image scores on this rank, in the data module's order.

    ``scores`` maps each score the reward reports to (M,) float32 (NaN where a check does not
    apply to a prompt); ``prompts`` holds the M prompts; ``step`` the optimizer step it ran at.
    """

    stage: str
    step: int
    prompts: list[str] = field(default_factory=list)
    scores: dict[str, Tensor] = field(default_factory=dict)

    def add(self, prompts: Sequence[str], scores: dict[str, Tensor]) -> None:
        self.prompts.extend(prompts)
        for key, value in scores.items():
            self.scores[key] = torch.cat([self.scores[key], value]) if key in self.scores else value

    def summary(self) -> dict[str, tuple[float, float]]:
        """Mean and standard error of every score (over this rank's images)."""
        return {key: mean_and_stderr(values) for key, values in self.scores.items()}


class EvalResults(Callback):
    """Collects what each validation and test run scored, as `EvalResult` objects.

    ``results`` lists them in order; ``latest(stage)`` is the last of a stage ("val" or "test").
    Sanity-check runs are left out.
    """

    def __init__(self):
        self.results: list[EvalResult] = []
        self._current: EvalResult | None = None

    def latest(self, stage: str = "val") -> EvalResult:
        for result in reversed(self.results):
            if result.stage == stage:
                return result
        raise LookupError(f"no {stage} evaluation has run yet")

    def _start(self, trainer: Any, stage: str) -> None:
        self._current = None if trainer.sanity_checking else EvalResult(stage, trainer.global_step)

    def _add(self, outputs: Any) -> None:
        if self._current is not None and outputs:
            self._current.add(outputs["prompts"], outputs["scores"])

    def _finish(self) -> None:
        if self._current is not None:
            self.results.append(self._current)
            self._current = None

    def on_validation_epoch_start(self, trainer, pl_module):
        self._start(trainer, "val")

    def on_test_epoch_start(self, trainer, pl_module):
        self._start(trainer, "test")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._add(outputs)

    on_test_batch_end = on_validation_batch_end

    def on_validation_epoch_end(self, trainer, pl_module):
        self._finish()

    on_test_epoch_end = on_validation_epoch_end
