"""The reward interface, a registry of reward classes and their weighted combination.

A reward scores a batch of decoded images against their prompts:

    reward(images, prompts, metadata) -> {"<name>": Tensor (B,), "<name>/<detail>": Tensor (B,), ...}

``images`` is a float tensor (B, 3, H, W) in [0, 1]; ``prompts`` a list of B strings;
``metadata`` a list of B dicts (the jsonl record of each prompt, ``{}`` for .txt prompts).
The entry named after the reward is its score; other entries are optional per-image details
for logging. Rewards run without gradients and never modify their inputs.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from tpgrpo.errors import UserInputError

# The module that registers each built-in reward; `build_reward` imports only the modules of the
# rewards a config names, so an optional reward whose dependencies are missing breaks only itself.
REWARD_MODULES: dict[str, str] = {
    "aesthetic": "tpgrpo.rewards.aesthetic",
    "clipscore": "tpgrpo.rewards.clipscore",
    "geneval": "tpgrpo.rewards.geneval_detector",
    "geneval_http": "tpgrpo.rewards.geneval_http",
    "jpeg_compressibility": "tpgrpo.rewards.jpeg",
    "jpeg_incompressibility": "tpgrpo.rewards.jpeg",
    "ocr": "tpgrpo.rewards.ocr",
    "pickscore": "tpgrpo.rewards.pickscore",
    "shapes": "tpgrpo.rewards.shapes",
}


class RewardRegistry(Mapping):
    """Reward name -> class: the classes registered so far and, imported on first lookup, the built-in ones.

    ``name in REWARDS`` and iteration cover every available name (`REWARD_MODULES` too) without
    importing anything; ``REWARDS[name]`` imports the reward's module if needed (`reward_class`).
    """

    def __init__(self, modules: Mapping[str, str]):
        self.classes: dict[str, type[Reward]] = {}
        self.modules = modules

    def __getitem__(self, name: str) -> type[Reward]:
        if name not in self.classes and name in self.modules:
            return reward_class(name)
        return self.classes[name]

    def __contains__(self, name: object) -> bool:
        return name in self.classes or name in self.modules

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(set(self.classes) | set(self.modules)))

    def __len__(self) -> int:
        return len(set(self.classes) | set(self.modules))


REWARDS = RewardRegistry(REWARD_MODULES)


def register_reward(name: str) -> Callable[[type["Reward"]], type["Reward"]]:
    """Class decorator: make a reward available to configs under ``name``.

    A built-in reward also needs an entry in `REWARD_MODULES` (its module is imported on demand).
    """

    def add(cls: type[Reward]) -> type[Reward]:
        if name in REWARDS.classes and REWARDS.classes[name] is not cls:
            raise ValueError(f"reward {name!r} is registered twice")
        cls.name = name
        REWARDS.classes[name] = cls
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

    def summarise(self, means: Mapping[str, float]) -> dict[str, float]:
        """Numbers of a whole evaluation computed from the means over all its images of the scores
        (``means``: score name -> mean, NaN-ignoring), logged as ``<stage>/<name>``; none by default."""
        return {}


@dataclass(frozen=True)
class RewardSpec:
    """One reward of the weighted total: its registered name, weight and keyword options."""

    name: str
    weight: float
    options: dict[str, Any] = field(default_factory=dict)


class WeightedTerm(torch.nn.Module):
    """One reward of a `WeightedReward` with its weight."""

    def __init__(self, reward: Reward, weight: float):
        super().__init__()
        self.reward = reward
        self.weight = float(weight)


class WeightedReward(torch.nn.Module):
    """Weighted sum of several rewards; returns their entries plus ``"reward"``, the total.

    ``terms``: each reward's name and `WeightedTerm` (reward and weight), in order.
    """

    def __init__(self, terms: Mapping[str, WeightedTerm]):
        super().__init__()
        if not terms:
            raise ValueError("at least one reward is needed")
        self.terms = torch.nn.ModuleDict(dict(terms))

    @property
    def rewards(self) -> dict[str, Reward]:
        return {name: term.reward for name, term in self.terms.items()}

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping] | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        for name, term in self.terms.items():
            reward = term.reward
            try:
                scores = reward(images, prompts, metadata)
            except Exception as error:  # name the failing reward; keep the original cause
                raise RuntimeError(f"reward {name!r} failed: {error}") from error
            main = scores[reward.name].to(device=total.device, dtype=torch.float32)
            total = total + term.weight * main
            out.update({key: value.detach().float().to(total.device) for key, value in scores.items()})
        out["reward"] = total
        return out

    def summarise(self, means: Mapping[str, float]) -> dict[str, float]:
        """Every reward's `Reward.summarise` of an evaluation, merged."""
        return {key: value for reward in self.rewards.values() for key, value in reward.summarise(means).items()}


def _imported_reward_class(name: str) -> type[Reward]:
    """A reward of the user's own named ``package.module:Class``: imported, and registered under
    that name unless its module registers it itself (its scores then carry the registered name)."""
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise RewardConfigError(f"reward {name!r}: importing {module_name} failed ({type(error).__name__}: {error})") from error
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise RewardConfigError(f"reward {name!r}: {module_name} has no subclass of tpgrpo.rewards.Reward named {class_name!r}")
    if cls not in REWARDS.classes.values():
        register_reward(name)(cls)
    return cls


def reward_class(name: str) -> type[Reward]:
    """The class registered as ``name``, importing the module of a built-in reward first; a name
    ``package.module:Class`` imports the user's own reward class.

    An unknown name is a `RewardConfigError` listing the available names; a reward module that
    fails to import (a missing optional dependency, a broken install) is one naming the reward and
    the cause. Other rewards are unaffected: only the requested reward's module is imported.
    """
    if name in REWARDS.classes:
        return REWARDS.classes[name]
    if ":" in name:
        return _imported_reward_class(name)
    module = REWARDS.modules.get(name)
    if module is None:
        raise RewardConfigError(
            f"unknown reward {name!r}; available: {', '.join(REWARDS)}; or a class of your own as package.module:Class"
        )
    try:
        importlib.import_module(module)
    except Exception as error:  # ImportError, or whatever the module raised while importing
        cause = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        raise RewardConfigError(
            f"reward {name!r} is unavailable: importing {module} failed ({cause}); "
            "install what it needs or remove it from the rewards"
        ) from error
    if name not in REWARDS.classes:
        raise RewardConfigError(f"reward {name!r} is unavailable: {module} does not register it")
    return REWARDS.classes[name]


def validate_reward_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Reward weights as floats, or a `RewardConfigError` saying what to change.

    Every weight must be a finite number (a NaN or infinite weight makes every total reward
    NaN or infinite) and at least one non-zero (all-zero weights train on nothing).
    """
    if not isinstance(weights, Mapping) or not weights:
        raise RewardConfigError("rewards: name at least one reward with its weight, e.g. {shapes: 1.0}")
    checked: dict[str, float] = {}
    for name, weight in weights.items():
        is_number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight):
            raise RewardConfigError(f"rewards.{name}: the weight must be a finite number, got {weight!r}; set e.g. 1.0")
        checked[str(name)] = float(weight)
    if not any(checked.values()):
        raise RewardConfigError("rewards: all weights are zero; give at least one reward a non-zero weight")
    return checked


def build_reward(
    rewards: Mapping[str, float] | Sequence[RewardSpec], options: Mapping[str, Mapping] | None = None
) -> WeightedReward:
    """Build the weighted reward of a config: ``{"shapes": 1.0, "jpeg_compressibility": 0.5}``
    (weights checked by `validate_reward_weights`; ``options`` maps a reward name to keyword
    arguments of its class), or of checked `RewardSpec`s (`tpgrpo.settings.parse_rewards`).
    Only the modules of the named rewards are imported (`reward_class`).
    """
    if isinstance(rewards, Mapping):
        weights = validate_reward_weights(rewards)
        options = dict(options or {})
        stray = sorted(set(options) - set(weights))
        if stray:
            raise RewardConfigError(f"options given for reward {stray[0]!r}, which is not in the rewards list")
        rewards = [RewardSpec(name, weight, dict(options.get(name, {}))) for name, weight in weights.items()]
    elif options:
        raise ValueError("options go inside the RewardSpecs")
    classes = {spec.name: reward_class(spec.name) for spec in rewards}
    return WeightedReward({spec.name: WeightedTerm(classes[spec.name](**spec.options), spec.weight) for spec in rewards})
