"""Means and standard errors of held-out scores."""
import pytest
import torch


def test_mean_and_stderr_against_the_formula():
    import math

    from tpgrpo.evaluation import mean_and_stderr

    mean, stderr = mean_and_stderr(torch.tensor([1.0, 2.0, float("nan"), 4.0]))
    # values 1, 2, 4: mean 7/3, sample variance ((4/3)² + (1/3)² + (5/3)²) / 2 = 7/3
    assert mean == pytest.approx(7 / 3) and stderr == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert math.isnan(mean_and_stderr(torch.tensor([5.0]))[1])
