"""Imports every built-in reward module so that each registers itself."""
import tpgrpo.rewards.jpeg  # noqa: F401
import tpgrpo.rewards.shapes  # noqa: F401
