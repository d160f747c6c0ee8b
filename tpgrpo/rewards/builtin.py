"""Imports every built-in reward module so that each registers itself."""
import tpgrpo.rewards.aesthetic  # noqa: F401
import tpgrpo.rewards.clipscore  # noqa: F401
import tpgrpo.rewards.geneval_http  # noqa: F401
import tpgrpo.rewards.jpeg  # noqa: F401
import tpgrpo.rewards.ocr  # noqa: F401
import tpgrpo.rewards.pickscore  # noqa: F401
import tpgrpo.rewards.shapes  # noqa: F401
