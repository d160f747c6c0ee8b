"""The demo's summary arithmetic (the end-to-end demo run is in tests/test_readme.py)."""
import math

from tpgrpo.demo import in_stderr


def test_in_stderr_by_hand_and_without_spread():
    assert in_stderr(0.03, 0.01) == 3.0 and in_stderr(-0.02, 0.01) == -2.0
    # a 2-step fit of a tiny eval set can leave every image's reward unchanged: no spread, no rise
    assert in_stderr(0.0, 0.0) == 0.0
    assert in_stderr(0.01, 0.0) == math.inf and in_stderr(-0.01, 0.0) == -math.inf
