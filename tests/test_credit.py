"""Hand-worked checks of spec §3 (credit) and §4 (advantages, loss)."""
import numpy as np
import pytest
import torch

from tpgrpo.credit import (
    active_rows,
    clipped_policy_loss,
    group_advantages,
    incremental_rewards,
    outcome_rewards,
    raw_turning_points,
    step_rewards,
    turning_point_rewards,
    turning_points,
)


def rows(*sequences):
    return torch.tensor(sequences, dtype=torch.float32)


def flags(*bits):
    return torch.tensor(bits, dtype=torch.bool)


# Each case: R_0..R_W, expected turning points, expected per-step rewards (η = 1), worked by hand.
CASES = {
    # d = [1, -0.5, 0]; the first step goes against R_W - R_1 = -0.5; no flip later.
    "none": ([0, 1, 0.5, 0.5], [False, False, False], [1, -0.5, 0]),
    # monotone rise: the first step moves the same way as everything after it.
    "first_step": ([0, 1, 2, 3], [True, False, False], [3, 1, 1]),
    # d = [-1, 2, 1], Δ = 2: step 1 flips a falling start and the rest keeps rising.
    "middle": ([0, -1, 1, 2], [False, True, False], [-1, 3, 1]),
    # falling trajectory, Δ = -2: step 1 flips a rising start, the rest keeps falling.
    "middle_falling": ([0, 1, -1, -2], [False, True, False], [1, -3, -1]),
    # the last step flips the trend but R_W - R_W = 0 never passes the consistency check.
    "last_step": ([0, 1, -1, 2], [True, False, False], [2, -2, 3]),
    # a flat step between a fall and a rise is not a flip (sign(0) = 0).
    "tie_breaks_flip": ([0, -1, -1, 1, 1], [False, False, False, False], [-1, 0, 2, 0]),
    # Δ = 0: no step can be a turning point.
    "no_trend": ([1, 1, 0, 1, 1], [False, False, False, False], [0, -1, 1, 0]),
    # binary reward, zeros at the start: d_0 = 0 has no sign.
    "binary": ([0, 0, 1, 1], [False, False, False], [0, 1, 0]),
    # two turning points in one row (t = 0 and t = 2).
    "two_in_row": ([0, 1, 0.5, 1.5, 2], [True, False, True, False], [2, -0.5, 1.5, 0.5]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hand_worked_single_rows(name):
    sequence, expected_flags, expected_rewards = CASES[name]
    r = rows(sequence)
    assert torch.equal(raw_turning_points(r)[0], flags(*expected_flags))
    # a single row has only one trend sign: balancing keeps everything
    assert torch.equal(turning_points(r, balance=True)[0], flags(*expected_flags))
    torch.testing.assert_close(turning_point_rewards(r)[0], torch.tensor(expected_rewards, dtype=torch.float32))


def test_eta_scales_only_turning_point_rewards():
    r = rows([0, -1, 1, 2])
    torch.testing.assert_close(turning_point_rewards(r, eta=0.5)[0], torch.tensor([-1.0, 1.5, 1.0]))


def test_incremental_rewards_telescoping():
    r = torch.randn(5, 7)
    d = incremental_rewards(r)
    torch.testing.assert_close(d.sum(1), r[:, -1] - r[:, 0])


def test_balancing_with_both_signs_keeps_largest_trend():
    r = rows(
        [0, 1, 2, 3],  # rising, Δ = 3, turning point at t = 0
        [0, -1, 1, 2],  # rising, Δ = 2, turning point at t = 1
        [0, 1, -1, -2],  # falling, Δ = -2, turning point at t = 1
    )
    kept = turning_points(r, balance=True)
    assert torch.equal(kept, flags([True, False, False], [False, False, False], [False, True, False]))
    assert int(raw_turning_points(r).sum()) == 3
    # the dropped turning point falls back to its incremental reward
    torch.testing.assert_close(turning_point_rewards(r)[1], torch.tensor([-1.0, 2.0, 1.0]))
    torch.testing.assert_close(turning_point_rewards(r, balance=False)[1], torch.tensor([-1.0, 3.0, 1.0]))


def test_balancing_ties_keep_lower_row_then_earlier_step():
    r = rows(
        [0, 1, 0.5, 1.5, 2],  # Δ = 2, turning points at t = 0 and t = 2
        [0, 1, 0.5, 1.5, 2],  # same again
        [0, 1, -1, -2, -3],  # Δ = -3, one turning point at t = 1
    )
    kept = turning_points(r)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 0] = True
    expected[2, 1] = True
    assert torch.equal(kept, expected)


def test_balancing_one_sign_or_none_keeps_all():
    rising = rows([0, 1, 2, 3], [0, -1, 1, 2])
    assert torch.equal(turning_points(rising), raw_turning_points(rising))
    assert int(turning_points(rising).sum()) == 2
    flat = rows([1, 1, 1], [0, 0, 0])
    assert not turning_points(flat).any()


def test_turning_point_rewards_shape_and_dtype():
    r = torch.rand(6, 10, dtype=torch.float64)
    out = turning_point_rewards(r)
    assert out.shape == (6, 9) and out.dtype == torch.float64
    assert turning_points(r).dtype == torch.bool and turning_points(r).shape == (6, 9)


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(3, 1), torch.zeros(2, 3, 4)])
def test_bad_reward_shapes_raise(bad):
    with pytest.raises(ValueError, match="shape"):
        turning_point_rewards(bad)


def test_integer_rewards_raise():
    with pytest.raises(ValueError, match="float"):
        turning_points(torch.zeros(2, 3, dtype=torch.long))


def test_outcome_rewards_repeat_final_reward():
    final = torch.tensor([0.5, -1.0])
    out = outcome_rewards(final, 3)
    torch.testing.assert_close(out, torch.tensor([[0.5, 0.5, 0.5], [-1.0, -1.0, -1.0]]))
    torch.testing.assert_close(step_rewards("outcome", rows([0, 1, 0.5], [2, 2, -1.0])), torch.tensor([[0.5, 0.5], [-1.0, -1.0]]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        outcome_rewards(torch.zeros(2, 2), 3)


def test_unknown_credit_lists_choices():
    with pytest.raises(ValueError, match="outcome"):
        step_rewards("bogus", rows([0, 1]))


def _reference_advantages(rewards, ids, eps, global_std=False):
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(rewards)
    for gid in np.unique(ids):
        members = ids == gid
        for col in range(rewards.shape[1]):
            column = rewards[members, col]
            std = rewards[:, col].std() if global_std else column.std()
            out[members, col] = (column - column.mean()) / (std + eps)
    return out


@pytest.mark.parametrize("global_std", [False, True])
def test_group_advantages_match_per_group_loop(global_std):
    generator = torch.Generator().manual_seed(0)
    rewards = torch.rand(12, 4, generator=generator)
    ids = torch.tensor([3, 3, 3, 7, 7, 7, 3, 1, 1, 1, 7, 1])
    got = group_advantages(rewards, ids, global_std=global_std)
    expected = _reference_advantages(rewards.numpy(), ids.numpy(), 1e-4, global_std)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


def test_group_advantages_invariants_and_clip():
    rewards = torch.tensor([[1.0], [0.0], [0.0], [0.0], [5.0], [5.0]])
    ids = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = group_advantages(rewards, ids)
    # zero mean per group, constant group -> zero advantages
    assert abs(float(adv[:4].sum())) < 1e-5
    assert torch.equal(adv[4:], torch.zeros(2, 1))
    # hand value: mean 0.25, std sqrt(3)/4
    assert float(adv[0, 0]) == pytest.approx(0.75 / (3**0.5 / 4 + 1e-4), rel=1e-6)
    clipped = group_advantages(rewards, ids, clip=1.0)
    assert float(clipped.max()) == 1.0
    assert torch.equal(active_rows(adv), torch.tensor([True, True, True, True, False, False]))
    # 1-D input keeps its shape
    assert group_advantages(rewards[:, 0], ids).shape == (6,)


def test_group_advantages_bad_inputs():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        group_advantages(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(ValueError, match="step_rewards"):
        group_advantages(torch.zeros(4, 2, 2), torch.zeros(4, dtype=torch.long))


def test_loss_inside_clip_range_is_minus_advantage_times_ratio():
    new = torch.tensor([0.0, 1e-6, -1e-6], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, metrics = clipped_policy_loss(new, old, adv, clip_range=1e-3)
    expected = (-adv * torch.exp(new.detach())).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(metrics["clip_frac"]) == 0.0
    loss.backward()
    torch.testing.assert_close(new.grad, -adv * torch.exp(new.detach()) / 3)


def test_loss_clips_and_stops_gradient_beyond_range():
    # ratio e^0.5 with positive advantage: the clipped term is the max, its gradient is 0
    new = torch.tensor([0.5, 0.5], requires_grad=True)
    old = torch.zeros(2)
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = clipped_policy_loss(new, old, adv, clip_range=0.2)
    expected = (-1.0 * 1.2 + 1.0 * float(np.exp(0.5))) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert float(metrics["clip_frac"]) == 1.0
    loss.backward()
    assert float(new.grad[0]) == 0.0 and float(new.grad[1]) != 0.0


def test_loss_clamps_advantages_and_checks_shapes():
    zeros = torch.zeros(2)
    loss, _ = clipped_policy_loss(zeros, zeros, torch.tensor([100.0, 100.0]), clip_range=0.1)
    assert float(loss) == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="shape"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_policy_loss(zeros, zeros, zeros, 0.0)


def test_outcome_rule_takes_final_rewards_with_the_window_size():
    final = torch.tensor([[0.5], [-1.0]])
    torch.testing.assert_close(step_rewards("outcome", final, num_steps=3), torch.tensor([[0.5] * 3, [-1.0] * 3]))
    with pytest.raises(ValueError, match="does not match"):
        step_rewards("outcome", torch.zeros(2, 3), num_steps=4)
