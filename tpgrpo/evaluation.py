"""Summaries of held-out scores: the one place that computes means and standard errors."""
from __future__ import annotations

import math

import torch


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean of a 1-D tensor, ignoring NaN (checks that do not apply).

    The standard error is the sample standard deviation (ddof 1) over the square root of the count;
    NaN with fewer than two values.
    """
    values = torch.as_tensor(values).double().flatten()
    values = values[~values.isnan()]
    if values.numel() < 2:
        return float(values.mean()) if values.numel() else math.nan, math.nan
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))
