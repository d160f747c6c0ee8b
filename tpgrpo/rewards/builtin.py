"""Imports every built-in reward module so that each registers itself."""
import tpgrpo.rewards.shapes  # noqa: F401
