"""Hand-worked checks of spec §3 (credit) and §4 (advantages, loss)."""
import numpy as np
import pytest
import torch

from tpgrpo.maths.credit import (
    active_rows,
    balance_turning_points,
    clipped_policy_loss,
    group_advantages,
    group_members,
    incremental_rewards,
    outcome_rewards,
    raw_turning_points,
    round_robin_order,
    step_rewards,
    turning_point_rewards,
    turning_points,
    update_parts,
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
    # a zero previous step is not a step against the trend (sign(0) = 0), so the next step flips nothing:
    # d = [0, 1, 1], Δ = 2: t = 1 has s_0 = 0 (and s_1 = +1, R_W - R_2 = 1 > 0, so only s_0 decides).
    "zero_step_then_rise": ([0, 0, 1, 2], [False, False, False], [0, 1, 1]),
    # d = [-1, 0, 2, 1], Δ = 2: t = 2 has s_1 = 0, s_2 = +1 and R_W - R_3 = 1 > 0; s_1 = 0 decides again.
    "flat_after_fall_then_rise": ([0, -1, -1, 1, 2], [False, False, False, False], [-1, 0, 2, 1]),
    # falling mirror: d = [1, 0, -2, -1], Δ = -2: t = 2 has s_1 = 0, s_2 = +1, sign(d_2)·sign(R_W - R_3) = +1.
    "flat_after_rise_then_fall": ([0, 1, 1, -1, -2], [False, False, False, False], [1, 0, -2, -1]),
    # W = 1: the only step is the last one, never a turning point.
    "single_step": ([0, 1], [False], [1]),
    # R_0 ≠ 0: the trend is the sign of R_W - R_0 = -2 (not of R_W + R_0 = 8). d = [1, -2, -1]: step 1
    # flips a rising start and R_W - R_2 = -1 keeps falling; its reward is R_W - R_1 = -3.
    "falling_positive_rewards": ([5, 6, 4, 3], [False, True, False], [1, -3, -1]),
    # Δ = 0 although step 2 rises after a fall and R_W - R_3 = 1 keeps rising: no trend, no turning point.
    "no_trend_dip": ([0, -1, -2, -1, 0], [False, False, False, False], [-1, -1, 1, 1]),
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


def test_balancing_many_ties_keep_the_lowest_rows():
    # binary-like rewards tie often: 24 rising rows [0, 1, 2] and 12 falling rows [0, -1, -2], every
    # one with its turning point at t = 0 and |Δ| = 2; m = 12 keeps rising rows 0-11 and every falling row
    r = rows(*([[0, 1, 2]] * 24 + [[0, -1, -2]] * 12))
    kept = turning_points(r)
    assert kept[:, 0].nonzero().flatten().tolist() == list(range(12)) + list(range(24, 36))
    assert not kept[:, 1].any()


def test_balancing_ranks_by_the_whole_trajectory_trend():
    # row 0 rises to 3 and falls back: Δ = 1 (turning point t = 0: d_0 = 0.5, R_W - R_1 = 0.5);
    # row 1, Δ = 3, turning point t = 0; row 2 falls, turning point t = 1. m = 1 keeps row 1, not row 0,
    # although row 0 went higher before its last step
    r = rows([0, 0.5, 3, 1], [0, 1, 2, 3], [0, 1, -1, -2])
    assert torch.equal(raw_turning_points(r)[0], flags(True, False, False))
    assert torch.equal(turning_points(r), flags([False, False, False], [True, False, False], [False, True, False]))


def test_balancing_one_sign_or_none_keeps_all():
    rising = rows([0, 1, 2, 3], [0, -1, 1, 2])
    assert torch.equal(turning_points(rising), raw_turning_points(rising))
    assert int(turning_points(rising).sum()) == 2
    flat = rows([1, 1, 1], [0, 0, 0])
    assert not turning_points(flat).any()


def test_balancing_small_trends_on_both_sides():
    # rewards in [0, 1]: |Δ| = 0.5 on both sides. Rows 0 and 1 rise (turning point t = 0: d_0 = 0.25 and
    # R_W - R_1 = 0.25), row 2 falls (t = 0 again); m = min(2, 1) = 1, the tie keeps row 0.
    r = rows([0, 0.25, 0.5], [0, 0.25, 0.5], [0.5, 0.25, 0])
    assert torch.equal(raw_turning_points(r), flags([True, False], [True, False], [True, False]))
    assert torch.equal(turning_points(r), flags([True, False], [False, False], [True, False]))


def test_balancing_puts_a_pair_with_no_trend_on_neither_side():
    # `balance_turning_points` takes any flags; a flagged row with Δ = 0 is neither rising nor falling,
    # so with it and falling rows only (or rising rows only) one side has pairs and all are kept
    flagged = flags([True, False], [True, False], [False, True])
    for sign in (-1.0, 1.0):
        trend = torch.tensor([0.0, sign, 2 * sign])
        assert torch.equal(balance_turning_points(flagged, trend), flagged)


@pytest.mark.parametrize(
    "flag_shape, trend_shape",
    [((2, 3), (3,)), ((3,), (3,)), ((2, 3, 1), (2,))],
)
def test_balancing_checks_shapes(flag_shape, trend_shape):
    with pytest.raises(ValueError, match="flags must be"):
        balance_turning_points(torch.zeros(flag_shape, dtype=torch.bool), torch.zeros(trend_shape))


# Rows for balancing in chunks: row 0 rises (Δ = 3, turning point t = 0), row 1 falls (Δ = -2, t = 1),
# rows 2 and 3 rise (Δ = 2, t = 1). Over all rows: 3 rising pairs against 1 falling, m = 1, so only
# row 0's (largest |Δ|) and row 1's stay.
CHUNK_ROWS = ([0, 1, 2, 3], [0, 1, -1, -2], [0, -1, 1, 2], [0, -1, 1, 2])
ALL_BALANCED = ([True, False, False], [False, True, False], [False, False, False], [False, False, False])
RAW = ([True, False, False], [False, True, False], [False, True, False], [False, True, False])


@pytest.mark.parametrize(
    "chunk, expected",
    [
        (None, ALL_BALANCED),
        (4, ALL_BALANCED),
        (9, ALL_BALANCED),
        (1, RAW),  # each row alone has one side only
        # rows 0-1: m = 1 keeps both; rows 2-3: rising only, both kept
        (2, RAW),
        # rows 0-2: 2 rising against 1 falling, m = 1 drops row 2 (|Δ| 2 < 3); row 3 alone is kept
        (3, ([True, False, False], [False, True, False], [False, False, False], [False, True, False])),
    ],
)
def test_balancing_in_chunks_of_consecutive_rows(chunk, expected):
    assert torch.equal(turning_points(rows(*CHUNK_ROWS), balance_chunk=chunk), flags(*expected))


def test_chunked_balancing_reaches_the_step_rewards():
    r = rows(*CHUNK_ROWS)
    # row 2, d = [-1, 2, 1]: its turning point survives in chunks of 2 (reward R_W - R_1 = 3), not over all rows
    torch.testing.assert_close(turning_point_rewards(r, balance_chunk=2)[2], torch.tensor([-1.0, 3.0, 1.0]))
    torch.testing.assert_close(turning_point_rewards(r)[2], torch.tensor([-1.0, 2.0, 1.0]))
    torch.testing.assert_close(step_rewards("tp", r, balance_chunk=2), turning_point_rewards(r, balance_chunk=2))
    with pytest.raises(ValueError, match="balance_chunk"):
        turning_points(r, balance_chunk=0)


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


def test_active_rows_keep_a_row_with_a_non_zero_advantage_at_some_step():
    advantages = torch.tensor(
        [
            [0.0, 0.0, 0.0],  # no signal anywhere: dropped
            [0.0, 1.5, 0.0],  # one step only
            [-2.0, 0.0, 0.0],
            [0.5, -0.5, 1.0],  # every step
        ]
    )
    assert active_rows(advantages).tolist() == [False, True, True, True]


def test_a_group_tied_at_one_step_still_trains_on_the_others():
    # group 0 ties at step 0 (advantages 0) and differs at step 1: mean 1, std 1, advantages ∓1/(1 + 1e-4);
    # group 1 ties everywhere
    rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0], [3.0, 3.0], [3.0, 3.0]])
    advantages = group_advantages(rewards, torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(advantages[:2], torch.tensor([[0.0, -1 / 1.0001], [0.0, 1 / 1.0001]]))
    assert active_rows(advantages).tolist() == [True, True, False, False]


def test_group_members_count_each_group_in_order_of_appearance():
    assert group_members(torch.tensor([5, 5, 2, 5, 2, 9])).tolist() == [0, 1, 0, 2, 1, 0]
    # a rank may hold no rows: still a long tensor, so update_parts stays integer too
    empty = torch.zeros(0, dtype=torch.long)
    assert group_members(empty).dtype == torch.long and update_parts(empty, 2).dtype == torch.long


def test_round_robin_order_takes_one_image_per_group_in_turn():
    assert round_robin_order(torch.tensor([4, 4, 4, 9, 9, 9])).tolist() == [0, 3, 1, 4, 2, 5]
    # 6 groups of 3 (18 rows, enough for an unstable sort to reorder ties): every group's first image,
    # then every second, then every third, each time in order of appearance
    ids = torch.arange(6).repeat_interleave(3)
    expected = [3 * g + member for member in range(3) for g in range(6)]
    assert round_robin_order(ids).tolist() == expected


def test_update_parts_by_hand_for_odd_groups():
    # members 0, 1, 2 in each group; (id + member) mod 2: group 0 -> 0, 1, 0 and group 1 -> 1, 0, 1
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    assert update_parts(ids, 2).tolist() == [0, 1, 0, 1, 0, 1]
    # order of appearance decides the member index, and ids of the same parity collide
    assert update_parts(torch.tensor([3, 7, 3, 7, 3, 7]), 2).tolist() == [1, 1, 0, 0, 1, 1]
    # three parts: group 0 -> 0, 1, 2 and group 1 -> 1, 2, 0 (member counted up, not down)
    assert update_parts(ids, 3).tolist() == [0, 1, 2, 1, 2, 0]


@pytest.mark.parametrize(
    "first_id, groups, group_size, parts, expected_counts",
    [
        # 4 groups of 3 (GroupSampler numbers a batch's groups consecutively): the extra image of
        # group g goes to part g mod 2, alternating, so 6 + 6 (ignoring the id: 8 + 4)
        (8, 4, 3, 2, [6, 6]),
        # 3 groups of 5 over 3 parts: the two extra images of group g go to parts g, g+1 (mod 3),
        # covering each part twice: 5 + 5 + 5 (ignoring the id: 6 + 6 + 3)
        (0, 3, 5, 3, [5, 5, 5]),
    ],
)
def test_update_parts_spread_odd_groups_evenly_over_the_optimizer_steps(first_id, groups, group_size, parts, expected_counts):
    ids = torch.arange(first_id, first_id + groups).repeat_interleave(group_size)
    part_of = update_parts(ids, parts)
    assert torch.bincount(part_of, minlength=parts).tolist() == expected_counts
    for group in ids.unique():
        per_part = torch.bincount(part_of[ids == group], minlength=parts)
        assert int(per_part.max() - per_part.min()) <= 1  # each group spread evenly on its own
    # a row's part depends only on its group id and member index: a rank holding half the groups agrees
    half = (groups // 2) * group_size
    assert torch.equal(update_parts(ids[half:], parts), part_of[half:])


def test_group_advantages_clip_both_ways():
    # one group: mean 0.25, std sqrt(3)/4, so the odd one out gets ±0.75 / (sqrt(3)/4 + 1e-4) ≈ ±1.73 and
    # the others ∓0.25 / (sqrt(3)/4 + 1e-4) ≈ ∓0.58, inside the clip
    inside = 0.25 / (3**0.5 / 4 + 1e-4)
    for sign in (1.0, -1.0):
        rewards = sign * torch.tensor([1.0, 0.0, 0.0, 0.0])
        clipped = group_advantages(rewards, torch.zeros(4, dtype=torch.long), clip=1.0)
        torch.testing.assert_close(clipped, sign * torch.tensor([1.0, -inside, -inside, -inside]))


@pytest.mark.xfail(
    strict=True,
    reason="update_parts spreads each group evenly, not the batch: (id + member) mod 4 for two groups of 6 "
    "gives parts of 3, 4, 3 and 2 images, though the update's docstring says the steps split the images evenly",
)
def test_update_parts_split_the_batch_evenly_over_four_steps():
    # group 0 (members 0-5) -> parts 0, 1, 2, 3, 0, 1; group 1 -> 1, 2, 3, 0, 1, 2: 3, 4, 3, 2 images
    ids = torch.tensor([0] * 6 + [1] * 6)
    assert torch.bincount(update_parts(ids, 4), minlength=4).tolist() == [3, 3, 3, 3]


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


def test_loss_ratio_is_the_exponential_of_the_log_prob_difference():
    # new - old = ±0.1: ratios e^0.1 and e^-0.1, inside the clip range; A = 1 for both,
    # loss = -(e^0.1 + e^-0.1) / 2 = -cosh(0.1)
    new, old = torch.tensor([0.5, 0.1]), torch.tensor([0.4, 0.2])
    loss, metrics = clipped_policy_loss(new, old, torch.ones(2), clip_range=0.2)
    assert float(loss) == pytest.approx(-np.cosh(0.1), rel=1e-6)
    assert float(metrics["ratio_mean"]) == pytest.approx(np.cosh(0.1), rel=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(np.exp(-0.1), rel=1e-6)
    assert float(metrics["ratio_max"]) == pytest.approx(np.exp(0.1), rel=1e-6)
    assert float(metrics["clip_frac"]) == 0.0


def test_loss_clips_a_ratio_below_the_range():
    # ratio e^-0.5 ≈ 0.607 < 1 - 0.2. A = -1: the clipped term -A·0.8 = 0.8 is the larger one;
    # A = +1: the unclipped -e^-0.5 is the larger one
    new, old = torch.full((2,), -0.5), torch.zeros(2)
    loss, metrics = clipped_policy_loss(new, old, torch.tensor([-1.0, 1.0]), clip_range=0.2)
    assert float(loss) == pytest.approx((0.8 - np.exp(-0.5)) / 2, rel=1e-6)
    assert float(metrics["clip_frac"]) == 1.0


def test_a_ratio_exactly_at_the_edge_of_the_range_is_not_clipped():
    # take ε = ratio - 1 exactly (float32 ratio e^0.4): the clamp leaves the ratio as it is, so clip_frac is 0
    new, old = torch.tensor([0.4]), torch.zeros(1)
    edge = float(torch.exp(new)) - 1.0
    loss, metrics = clipped_policy_loss(new, old, torch.ones(1), clip_range=edge)
    assert float(metrics["clip_frac"]) == 0.0
    assert float(loss) == pytest.approx(-(1.0 + edge), rel=1e-7)


def test_loss_clamps_advantages_and_checks_shapes():
    zeros = torch.zeros(2)
    loss, _ = clipped_policy_loss(zeros, zeros, torch.tensor([100.0, 100.0]), clip_range=0.1)
    assert float(loss) == pytest.approx(-5.0)
    with pytest.raises(ValueError, match="shape"):
        clipped_policy_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="clip_range"):
        clipped_policy_loss(zeros, zeros, zeros, 0.0)


def test_outcome_rewards_of_a_single_step():
    torch.testing.assert_close(outcome_rewards(torch.tensor([0.5, -1.0]), 1), torch.tensor([[0.5], [-1.0]]))
    with pytest.raises(ValueError, match="num_steps"):
        outcome_rewards(torch.tensor([0.5]), 0)


def test_outcome_rule_accepts_only_the_matching_window_size():
    sequence = rows([0, 1, 0.5])  # W = 2
    torch.testing.assert_close(step_rewards("outcome", sequence, num_steps=2), torch.tensor([[0.5, 0.5]]))
    for wrong in (1, 3):
        with pytest.raises(ValueError, match="does not match"):
            step_rewards("outcome", sequence, num_steps=wrong)


def test_outcome_rule_takes_final_rewards_with_the_window_size():
    final = torch.tensor([[0.5], [-1.0]])
    torch.testing.assert_close(step_rewards("outcome", final, num_steps=3), torch.tensor([[0.5] * 3, [-1.0] * 3]))
    with pytest.raises(ValueError, match="does not match"):
        step_rewards("outcome", torch.zeros(2, 3), num_steps=4)


def test_each_credit_rule_declares_what_it_needs_and_returns_its_turning_points():
    import inspect

    import tpgrpo.algorithms.grpo
    import tpgrpo.algorithms.nft
    from tpgrpo.maths.credit import CREDITS

    tp, outcome = CREDITS["tp"], CREDITS["outcome"]
    assert tp.needs_branches and tp.options == ("eta", "balance", "balance_chunk")
    assert not outcome.needs_branches and outcome.options == ("num_steps",)
    # one rising row with a turning point at step 0 (d_0 = 1 and R_2 - R_1 = 1 share a sign)
    per_step, kept = tp.assign(rows([0, 1, 2]), eta=0.5)
    assert kept.tolist() == [[True, False]] and per_step.tolist() == [[1.0, 1.0]]  # 0.5·(2 - 0), then d_1
    per_step, kept = outcome.assign(rows([2.0]), num_steps=3)  # without branches: the final reward only
    assert kept is None and per_step.tolist() == [[2.0, 2.0, 2.0]]
    for module in (tpgrpo.algorithms.grpo, tpgrpo.algorithms.nft):  # algorithms ask the rule, never test its name
        assert "method ==" not in inspect.getsource(module) and '"tp" in' not in inspect.getsource(module)
