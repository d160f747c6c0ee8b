"""Reward functions behind one interface, looked up by name (see `base.py`)."""
from tpgrpo.rewards.base import (
    REWARD_MODULES,
    REWARDS,
    Reward,
    RewardConfigError,
    RewardSpec,
    WeightedReward,
    WeightedTerm,
    build_reward,
    register_reward,
    reward_class,
    validate_reward_weights,
)

__all__ = [
    "REWARD_MODULES",
    "REWARDS",
    "Reward",
    "RewardConfigError",
    "RewardSpec",
    "WeightedReward",
    "WeightedTerm",
    "build_reward",
    "register_reward",
    "reward_class",
    "validate_reward_weights",
]
