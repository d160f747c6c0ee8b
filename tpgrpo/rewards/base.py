"""The reward interface, a registry of reward classes and their weighted combination.

A reward scores a batch of decoded images against their prompts:

    reward(images, prompts, metadata) -> {"<name>": Tensor (B,), "<name>/<detail>": Tensor (B,), ...}

``images`` is a float tensor (B, 3, H, W) in [0, 1]; ``prompts`` a list of B strings;
``metadata`` a list of B dicts (the jsonl record of each prompt, ``{}`` for .txt prompts).
The entry named after the reward is its score; other entries are optional per-image details
for logging. Rewards run without gradients and never modify their inputs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Callable

import torch

from tpgrpo.errors import UserInputError

REWARDS: dict[str, type["Reward"]] = {}


def register_reward(name: str) -> Callable[[type["Reward"]], type["Reward"]]:
    """Class decorator: make a reward available to configs under ``name``."""

    def add(cls: type[Reward]) -> type[Reward]:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward {name!r} is registered twice")
        cls.name = name
        REWARDS[name] = cls
        return cls

    return add


class RewardConfigError(UserInputError):
    """A reward's option is wrong or what it names (a model, a file, a program) is missing."""


class Reward(torch.nn.Module):
    """Base class: subclasses implement `score` and may hold (frozen) models."""

    name: str = "reward"

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping] | None = None
    ) -> dict[str, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        if len(metadata) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(metadata)} metadata records")
        return self.score(images, prompts, metadata)


class WeightedReward(torch.nn.Module):
    """Weighted sum of several rewards; returns their entries plus ``"reward"``, the total."""

    def __init__(self, rewards: Mapping[str, Reward], weights: Mapping[str, float]):
        super().__init__()
        if not rewards:
            raise ValueError("at least one reward is needed")
        self.rewards = torch.nn.ModuleDict(dict(rewards))
        self.weights = dict(weights)

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping] | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for name, reward in self.rewards.items():
            try:
                scores = reward(images, prompts, metadata)
            except Exception as error:  # name the failing reward; keep the original cause
                raise RuntimeError(f"reward {name!r} failed: {error}") from error
            main = scores[name].to(device=total.device, dtype=torch.float32)
            total = total + self.weights[name] * main
            out.update({key: value.detach().float().to(total.device) for key, value in scores.items()})
        out["reward"] = total
        return out


def build_reward(weights: Mapping[str, float], options: Mapping[str, Mapping] | None = None) -> WeightedReward:
    """Build the weighted reward of a config: ``{"shapes": 1.0, "jpeg": 0.5}``.

    ``options`` maps a reward name to keyword arguments of its class.
    """
    import tpgrpo.rewards.builtin  # noqa: F401  (registers the built-in rewards)

    options = dict(options or {})
    unknown = sorted(set(weights) - set(REWARDS))
    if unknown:
        raise ValueError(f"unknown reward {unknown[0]!r}; available: {', '.join(sorted(REWARDS))}")
    stray = sorted(set(options) - set(weights))
    if stray:
        raise ValueError(f"options given for reward {stray[0]!r}, which is not in the rewards list")
    rewards = {name: REWARDS[name](**options.get(name, {})) for name in weights}
    return WeightedReward(rewards, {name: float(w) for name, w in weights.items()})
