"""What every algorithm shares: the protocol the trainer calls, the registry, the update plan.

An algorithm collects a batch (rollouts, decoding, rewards, advantages), names the units its
update trains (images × transitions or timesteps) and gives the loss of one transformer call over
some of them. `plan_update` turns a batch into the calls of each optimizer step and their loss
weights; the LightningModule only runs that plan (backward, clipping, optimizer step), and
`tpgrpo.algorithms.diagnostics` and the benchmarks read the same plan.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor, nn

from tpgrpo.distributed import Collectives
from tpgrpo.errors import UserInputError
from tpgrpo.families import FlowModel, PromptEmbeds
from tpgrpo.maths import credit as credit_rules
from tpgrpo.maths.rollout import VelocityFn, sample_window_start
from tpgrpo.prompt_length import PromptLengthCheck


def seed_for(*parts: Any) -> int:
    """A reproducible 63-bit seed from any values (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


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


class Batch(Protocol):
    """What the trainer reads of any algorithm's batch: N images of prompt groups."""

    prompts: list[str]
    group_ids: Tensor  # (N,)
    rewards: Tensor  # (N, K): column -1 is the reward of each image
    scores: dict[str, Tensor]  # every score of the reward, shaped like ``rewards``
    advantages: Tensor  # (N, U): one per trained unit; an image with all zeros is not trained
    images: Tensor  # (N, 3, H, W) in [0, 1]
    nfe_per_image: int


def transition_pairs(rows: Tensor, transitions: Sequence[int]) -> tuple[Tensor, Tensor]:
    """All (image, unit) pairs of ``rows`` and ``transitions``, unit-major: (M,), (M,)."""
    rows = rows.flatten()
    index = torch.as_tensor(list(transitions), dtype=torch.long, device=rows.device)
    return rows.repeat(len(index)), index.repeat_interleave(rows.numel())


@dataclass(frozen=True)
class LossCall:
    """One transformer call of the update: the (image, unit) pairs ``(rows[i], units[i])`` and the
    weight its mean loss takes in the optimizer step's loss (0 for a padding call)."""

    rows: Tensor
    units: Tensor
    weight: float

    @property
    def padding(self) -> bool:
        return self.weight == 0.0


@dataclass(frozen=True)
class StepPlan:
    """The calls of one optimizer step and the images it trains on all ranks (0: the step has no
    learning signal and leaves the weights unchanged)."""

    calls: list[LossCall]
    images_on_all_ranks: int


def plan_update(
    active: Tensor,
    part_of: Tensor,
    steps: int,
    units: Sequence[int],
    micro_batch: int | None,
    max_pairs_per_call: int | None,
    comm: Collectives,
) -> list[StepPlan]:
    """The calls of each of ``steps`` optimizer steps over the active images.

    Step ``s`` trains the active rows with ``part_of == s`` (`tpgrpo.maths.credit.update_parts`) at every
    unit, in micro-batches of ``micro_batch`` images, each split into calls of at most
    ``max_pairs_per_call`` pairs (None: no limit). Each step's loss is the mean over its images on
    all ranks and over the units; gradients are averaged over ranks after each backward pass, hence
    the factor of the world size in the weights. Ranks with fewer calls get zero-weighted padding
    calls, so that all ranks make the same transformer calls (FSDP needs it).
    """
    plans = []
    for index in range(steps):
        part = (active & (part_of == index)).nonzero().flatten()
        total = int(comm.sum(part.numel()))
        calls: list[LossCall] = []
        if total:
            micro = micro_batch or max(part.numel(), 1)
            for rows in part.split(micro):
                pair_rows, pair_units = transition_pairs(rows, units)
                limit = max_pairs_per_call or max(pair_rows.numel(), 1)
                for call_rows, call_units in zip(pair_rows.split(limit), pair_units.split(limit)):
                    weight = call_rows.numel() / total / len(units) * comm.world_size
                    calls.append(LossCall(call_rows, call_units, weight))
            padding = torch.zeros(1, dtype=torch.long, device=part.device)
            calls += [LossCall(padding, padding, 0.0)] * (int(comm.max(len(calls))) - len(calls))
        plans.append(StepPlan(calls, total))
    return plans


class FlowAlgorithm:
    """The machinery every algorithm on a flow model shares: prompts, CFG velocity, seeded noise,
    the collectives, and the update plan over the units of `trained_units`.

    Subclasses give ``collect(prompts, metadata, group_ids, step) -> Batch``, ``trained_units(batch)``
    and ``loss(batch, rows, units) -> (loss, metrics)``.

    Args:
        flow: the frozen pipeline (`tpgrpo.families.FlowModel`).
        transformer: the transformer to roll out and train (LoRA-wrapped, possibly sharded).
        reward: ``reward(images, prompts, metadata) -> {"reward": (N,), ...}``.
        sampling, update: the settings groups (`tpgrpo.settings`).
        seed: base seed of rollout noise and window draws.
        collectives: cross-rank operations; None reads ``torch.distributed`` at each call.
    """

    setting_groups: tuple[str, ...] = ()  # the settings groups beside sampling and update it takes

    def __init__(
        self,
        flow: FlowModel,
        transformer: nn.Module,
        reward: Callable[..., dict[str, Tensor]],
        sampling: Any,
        update: Any,
        seed: int = 0,
        collectives: Collectives | None = None,
    ):
        self.flow = flow
        self.transformer = transformer
        self.reward = reward
        self.sampling = sampling
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

    def start_rollout(
        self, prompts: Sequence[str], group_ids: Tensor, step: Any, timer: PhaseTimer
    ) -> tuple[Tensor, int, Tensor, Tensor, PromptEmbeds]:
        """What a rollout batch begins with: the group ids on the device, the SDE window's start (the
        same on every rank: ranks must make the same transformer calls, see `tpgrpo.distributed`), the
        initial and window noise (`rollout_noise`) and the prompts' embeddings (timed as ``encode``)."""
        sampling = self.sampling
        group_ids = group_ids.to(self.device)
        window_start = sample_window_start(
            sampling.num_steps, sampling.window_size, sampling.window_range, torch.Generator().manual_seed(seed_for(self.seed, step))
        )
        initial_noise, step_noise = self.rollout_noise(group_ids, step)
        with timer("encode"):
            cond = self.encode(prompts)
        return group_ids, window_start, initial_noise, step_noise, cond

    @contextmanager
    def sampling_mode(self) -> Iterator[None]:
        """The transformer in eval mode for a rollout, then back in the mode it was in."""
        was_training = self.transformer.training
        self.transformer.eval()
        try:
            yield
        finally:
            self.transformer.train(was_training)

    def score(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping], per_image: int) -> dict[str, Tensor]:
        """The reward's scores of ``images`` (N·per_image, ...; each prompt's ``per_image`` images in a
        row), each shaped (N, per_image)."""
        scores = self.reward(
            images, [p for p in prompts for _ in range(per_image)], [m for m in metadata for _ in range(per_image)]
        )
        return {key: value.view(-1, per_image) for key, value in scores.items()}

    def trained_units(self, batch: Any) -> list[int]:
        """The units (transitions, times) the update trains of each image."""
        raise NotImplementedError

    def trained_rows(self, batch: Any) -> Tensor:
        """The images the update trains, bool (N,): by default those with a non-zero advantage."""
        return credit_rules.active_rows(batch.advantages)

    def plan(self, batch: Any, steps: int) -> list[StepPlan]:
        """The update of ``batch`` as ``steps`` optimizer steps (`plan_update`)."""
        return plan_update(
            self.trained_rows(batch),
            credit_rules.update_parts(batch.group_ids, steps),
            steps,
            self.trained_units(batch),
            self.update.train_micro_batch,
            self.update.max_latents_per_call,
            self.comm(),
        )


@dataclass(frozen=True)
class AlgorithmEntry:
    """A registered algorithm: its class and the keyword defaults of this entry."""

    cls: type
    defaults: Mapping[str, Any]


ALGORITHMS: dict[str, AlgorithmEntry] = {}


def register_algorithm(name: str, **defaults: Any) -> Callable[[type], type]:
    """Class decorator: make ``cls(..., **defaults)`` the algorithm ``name`` (``model.algorithm``).
    One class may be registered under several names with different defaults."""

    def add(cls: type) -> type:
        ALGORITHMS[name] = AlgorithmEntry(cls, dict(defaults))
        return cls

    return add


def build_algorithm(name: str, *args: Any, groups: Mapping[str, Any], **kwargs: Any) -> FlowAlgorithm:
    """The algorithm ``name`` built with ``args`` and ``kwargs`` (`FlowAlgorithm`'s) and those of the
    settings ``groups`` (e.g. ``{"credit": ..., "nft": ...}``) its class names in ``setting_groups``."""
    if name not in ALGORITHMS:
        raise UserInputError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {name!r}")
    entry = ALGORITHMS[name]
    own = {group: groups[group] for group in entry.cls.setting_groups if group in groups}
    return entry.cls(*args, **entry.defaults, **own, **kwargs)
