"""Reward functions behind one interface, looked up by name (see `base.py`)."""
from tpgrpo.rewards.base import REWARDS, Reward, WeightedReward, build_reward, register_reward

__all__ = ["REWARDS", "Reward", "WeightedReward", "build_reward", "register_reward"]
