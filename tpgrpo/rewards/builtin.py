"""Imports every built-in reward module (`tpgrpo.rewards.base.REWARD_MODULES`), e.g. to list them all.

Configs do not need it: `tpgrpo.rewards.build_reward` imports only the rewards it is asked for.
A module that fails to import raises `tpgrpo.rewards.base.RewardConfigError` naming its reward.
"""
from __future__ import annotations

from tpgrpo.rewards.base import REWARD_MODULES, reward_class


def import_all() -> None:
    """Import and register every built-in reward."""
    for name in REWARD_MODULES:
        reward_class(name)
