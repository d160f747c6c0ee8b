"""Means and standard errors of held-out scores."""
import pytest
import torch


def test_mean_and_stderr_against_the_formula():
    import math

    from tpgrpo.training.evaluation import mean_and_stderr

    mean, stderr = mean_and_stderr(torch.tensor([1.0, 2.0, float("nan"), 4.0]))
    # values 1, 2, 4: mean 7/3, sample variance ((4/3)² + (1/3)² + (5/3)²) / 2 = 7/3
    assert mean == pytest.approx(7 / 3) and stderr == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))
    assert math.isnan(mean_and_stderr(torch.tensor([5.0]))[1])


def test_summaries_come_from_the_rewards_over_all_ranks_images():
    """Two ranks' GenEval columns: GenEval's overall number is the mean of the tags' rates over both
    ranks' images, computed by the reward's own summary hook, not by the evaluation code."""
    import math
    from pathlib import Path

    import tpgrpo.training.evaluation as evaluation
    from tpgrpo.distributed import Collectives
    from tpgrpo.rewards.geneval import geneval_summary

    nan = math.nan
    own = [{"geneval/counting": torch.tensor([1.0, nan]), "geneval/colors": torch.tensor([nan, 0.0]),
            "reward": torch.tensor([0.5, 0.25])}]
    # the other rank's sum and count of each score GenEval's summary asks for, in the order of its
    # tags: single_object and two_object none, counting 0 over one image, colors 1 + 1 over two,
    # position and color_attr none (scores nobody asks for are never reduced)
    other_rank = iter([0.0, 0, 0.0, 0, 0.0, 1, 2.0, 2, 0.0, 0, 0.0, 0])
    comm = Collectives(rank=0, world_size=2, sum=lambda value: value + next(other_rank))
    summary = evaluation.summarise_over_ranks(own, comm, stderr_keys=(), summarise=lambda m: geneval_summary("geneval", m))
    # counting: (1 + 0) / 2 = 0.5; colors: (0 + 1 + 1) / 3 = 2/3; overall: their mean
    assert summary.summaries == {"geneval/overall": pytest.approx((0.5 + 2 / 3) / 2)}
    assert "geneval" not in Path(evaluation.__file__).read_text().lower()
    assert geneval_summary("geneval", {"geneval/counting": nan}) == {}
