"""Rollout engine against the sequential reference: same numbers, minimum NFE, batching limits."""
import pytest
import torch

from tpgrpo.maths.rollout import (
    Rollout,
    completion_grid,
    minimum_nfe,
    rollout,
    rollout_sequential,
    sample_window_start,
    sequential_nfe,
)
from tpgrpo.maths.sde import ode_step, sde_step, step_kind

BATCH, CHANNELS, SIZE = 3, 4, 5


class ToyVelocity:
    """Deterministic nonlinear velocity depending on the latents, sigma and the image row.

    Records the number of latents of every call.
    """

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(CHANNELS, CHANNELS, generator=g) / CHANNELS**0.5
        self.row_bias = torch.randn(BATCH, CHANNELS, 1, 1, generator=g)
        self.call_sizes: list[int] = []

    def __call__(self, latents: torch.Tensor, sigma: float, rows: torch.Tensor) -> torch.Tensor:
        self.call_sizes.append(latents.shape[0])
        mixed = torch.einsum("oc,nchw->nohw", self.weight, latents)
        return torch.tanh(mixed) * (1 + sigma) + sigma * self.row_bias[rows] - (1 - sigma) * latents


def shifted_sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    t = torch.linspace(1, 0, num_steps + 1)
    return shift * t / (1 + (shift - 1) * t)


def initial_latents(seed: int = 1) -> torch.Tensor:
    return torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def run_both(num_steps, start, size, *, seed=2, **kwargs):
    """Sequential reference and engine on the same inputs and the same noise seed."""
    max_batch = kwargs.pop("max_batch", None)
    step = step_kind(kwargs.pop("kind", "cps"), kwargs.pop("noise_level"))
    args = (initial_latents(), shifted_sigmas(num_steps), start, size, step)
    seq_fn, eng_fn = ToyVelocity(), ToyVelocity()
    reference = rollout_sequential(seq_fn, *args, generator=torch.Generator().manual_seed(seed), **kwargs)
    engine = rollout(eng_fn, *args, generator=torch.Generator().manual_seed(seed), max_batch=max_batch, **kwargs)
    return reference, engine, seq_fn, eng_fn


def run_engine(num_steps=6, start=1, size=4, noise_level=0.7, *, seed=0, velocity_fn=None, **kwargs):
    """The engine on the standard toy inputs, noise drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    args = (initial_latents(), shifted_sigmas(num_steps), start, size, step_kind(kwargs.pop("kind", "cps"), noise_level))
    return rollout(velocity_fn or ToyVelocity(), *args, generator=generator, **kwargs)


def assert_same_rollout(a: Rollout, b: Rollout) -> None:
    assert a.states.shape == b.states.shape and a.final_latents.shape == b.final_latents.shape
    torch.testing.assert_close(a.states, b.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.final_latents, b.final_latents, atol=1e-5, rtol=1e-5)


CASES = [  # (T, s, W, kind, branches, max_batch)
    (10, 0, 9, "cps", True, None),
    (10, 0, 9, "sde", True, 5),
    (6, 2, 3, "cps", True, 4),
    (6, 2, 3, "sde", False, None),
    (5, 4, 1, "cps", True, 1),
    (4, 0, 4, "sde", True, None),
    (7, 1, 2, "cps", True, 7),
]


@pytest.mark.parametrize("num_steps, start, size, kind, branches, max_batch", CASES)
def test_engine_matches_sequential_at_the_formula_nfe(num_steps, start, size, kind, branches, max_batch):
    reference, engine, seq_fn, eng_fn = run_both(
        num_steps, start, size, noise_level=0.7, kind=kind, branches=branches, max_batch=max_batch
    )
    assert_same_rollout(reference, engine)
    assert engine.nfe_per_image == minimum_nfe(num_steps, start, size, branches)
    assert reference.nfe_per_image == sequential_nfe(num_steps, start, size, branches)
    # the counts on the record are the calls the model actually received
    assert engine.transformer_calls == len(eng_fn.call_sizes)
    assert sum(eng_fn.call_sizes) == engine.nfe_per_image * BATCH
    assert reference.transformer_calls == len(seq_fn.call_sizes) == reference.nfe_per_image
    assert set(seq_fn.call_sizes) == {BATCH}
    if max_batch is None:
        assert engine.transformer_calls == num_steps  # one call per timestep
    else:
        assert max(eng_fn.call_sizes) <= max_batch


def test_sd3_defaults_cost_55_instead_of_64():
    assert minimum_nfe(10, 0, 9) == 55 and sequential_nfe(10, 0, 9) == 64
    reference, engine, _, _ = run_both(10, 0, 9, noise_level=0.7)
    assert (engine.nfe_per_image, reference.nfe_per_image) == (55, 64)


@pytest.mark.parametrize(
    "num_steps, start, size, expected",
    [(10, 0, 9, 55), (10, 1, 9, 10 + 8 + 28), (6, 2, 3, 6 + 3 + 2 + 1), (5, 4, 1, 5), (1, 0, 1, 1)],
)
def test_minimum_nfe_formula(num_steps, start, size, expected):
    assert minimum_nfe(num_steps, start, size) == expected
    assert minimum_nfe(num_steps, start, size, branches=False) == num_steps


def test_shapes_and_record():
    reference, engine, _, _ = run_both(6, 2, 3, noise_level=0.7)
    assert engine.states.shape == (BATCH, 4, CHANNELS, SIZE, SIZE)
    assert engine.log_probs.shape == (BATCH, 3)
    assert engine.final_latents.shape == (BATCH, 4, CHANNELS, SIZE, SIZE)
    assert engine.num_steps == 6 and engine.branch_steps is None
    sigmas = shifted_sigmas(6)
    torch.testing.assert_close(engine.trained_sigmas, sigmas[2:5])
    torch.testing.assert_close(engine.trained_sigmas_next, sigmas[3:6])
    torch.testing.assert_close(engine.main_latents, engine.final_latents[:, -1])


def test_stored_transitions_replay_to_the_stored_log_probs():
    velocity_fn = ToyVelocity()
    out = run_engine(velocity_fn=velocity_fn)
    rows = torch.arange(BATCH)
    for i in range(4):
        sigma, sigma_next = float(out.trained_sigmas[i]), float(out.trained_sigmas_next[i])
        velocity = velocity_fn(out.states[:, i], sigma, rows)
        _, log_prob, _ = sde_step(velocity, out.states[:, i], sigma, sigma_next, step_kind("cps", 0.7), prev_sample=out.states[:, i + 1])
        torch.testing.assert_close(log_prob, out.log_probs[:, i], atol=1e-5, rtol=1e-5)


def test_without_branches_only_the_main_trajectory_is_computed():
    with_branches = run_engine(seed=3)
    main_only = run_engine(seed=3, branches=False)
    assert main_only.final_latents.shape == (BATCH, 1, CHANNELS, SIZE, SIZE)
    assert main_only.nfe_per_image == 6 and main_only.transformer_calls == 6
    torch.testing.assert_close(main_only.main_latents, with_branches.main_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(main_only.states, with_branches.states, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["cps", "sde"])
def test_zero_noise_makes_every_completion_the_ode_solution(kind):
    sigmas = shifted_sigmas(6)
    velocity_fn = ToyVelocity()
    out = run_engine(noise_level=0.0, kind=kind, velocity_fn=velocity_fn)
    expected, rows = initial_latents(), torch.arange(BATCH)
    for j in range(6):
        sigma, sigma_next = float(sigmas[j]), float(sigmas[j + 1])
        expected = ode_step(velocity_fn(expected, sigma, rows), expected, sigma, sigma_next)
    for k in range(out.final_latents.shape[1]):
        torch.testing.assert_close(out.final_latents[:, k], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(out.log_probs == 0)


def test_generator_and_step_noise_are_the_same_draw():
    step_noise = torch.randn((BATCH, 3, CHANNELS, SIZE, SIZE), generator=torch.Generator().manual_seed(9))
    drawn = run_engine(5, 1, 3, seed=9)
    given = rollout(ToyVelocity(), initial_latents(), shifted_sigmas(5), 1, 3, step_kind("cps", 0.7), step_noise=step_noise)
    assert_same_rollout(drawn, given)
    assert not torch.allclose(run_engine(5, 1, 3, seed=10).states, drawn.states)


def test_completion_grid():
    assert completion_grid(3, 10) == list(range(3, 11))
    assert completion_grid(0, 10, 2) == [0, 5, 10]
    assert completion_grid(1, 10, 3) == [1, 4, 7, 10]
    assert completion_grid(8, 10, 5) == [8, 9, 10]  # fewer steps left than asked: exact


@pytest.mark.parametrize("branch_steps", [1, 2, 3])
def test_branch_steps_approximation_matches_its_reference_at_its_nfe(branch_steps):
    reference, engine, _, eng_fn = run_both(10, 0, 9, noise_level=0.7, branch_steps=branch_steps, max_batch=7)
    assert_same_rollout(reference, engine)
    assert engine.branch_steps == branch_steps
    assert engine.nfe_per_image == minimum_nfe(10, 0, 9, branch_steps=branch_steps)
    assert reference.nfe_per_image == sequential_nfe(10, 0, 9, branch_steps=branch_steps)
    assert max(eng_fn.call_sizes) <= 7
    # m steps per completion, the first reused: T + Σ_k (min(m, T - k) - 1)
    assert engine.nfe_per_image == 10 + sum(min(branch_steps, 10 - k) - 1 for k in range(9))


def test_branch_steps_covering_all_steps_is_exact():
    exact, coarse = run_engine(), run_engine(branch_steps=6)
    torch.testing.assert_close(coarse.final_latents, exact.final_latents)
    assert coarse.nfe_per_image == exact.nfe_per_image


def test_sample_window_start_is_uniform_over_its_range():
    generator = torch.Generator().manual_seed(0)
    draws = [sample_window_start(10, 3, (2, 8), generator) for _ in range(400)]
    assert set(draws) == {2, 3, 4, 5}
    assert sample_window_start(10, 9, (0, 9)) == 0  # SD3.5-M defaults
    assert sample_window_start(6, 6) == 0  # default range (0, T)


@pytest.mark.parametrize(
    "num_steps, size, window_range, match",
    [
        (10, 11, (0, 10), "window_size"),
        (10, 0, (0, 10), "window_size"),
        (10, 3, (0, 11), "window_range"),
        (10, 3, (-1, 5), "window_range"),
        (10, 3, (6, 8), "does not fit"),
        (0, 1, (0, 1), "num_steps"),
    ],
)
def test_sample_window_start_errors(num_steps, size, window_range, match):
    with pytest.raises(ValueError, match=match):
        sample_window_start(num_steps, size, window_range)



def rollout_arguments(steps: int, window: int, change: dict) -> dict:
    """A toy rollout's arguments over ``steps`` shifted steps, a ``window`` from step 1, with ``change`` applied."""
    arguments = dict(
        velocity_fn=ToyVelocity(), initial_latents=initial_latents(), sigmas=shifted_sigmas(steps), window_start=1,
        window_size=window, step=step_kind("cps", 0.7),
    )
    return {**arguments, **change}

@pytest.mark.parametrize(
    "change, match",
    [
        (dict(window_start=4, window_size=3), "does not fit"),
        (dict(window_size=0), "window_size"),
        (dict(sigmas=torch.tensor([1.0, 0.5, 0.7, 0.0])), "decreasing"),
        (dict(initial_latents=torch.zeros(CHANNELS, SIZE, SIZE)), "initial_latents"),
        (dict(step_noise=torch.zeros(BATCH, 1, CHANNELS, SIZE, SIZE)), "step_noise"),
        (dict(max_batch=0), "max_batch"),
        (dict(branch_steps=0), "branch_steps"),
    ],
)
def test_rollout_rejects_bad_arguments(change, match):
    with pytest.raises(ValueError, match=match):
        rollout(**rollout_arguments(5, 2, change))


def test_ode_sample_is_the_euler_loop():
    from tpgrpo.maths.rollout import ode_sample
    from tpgrpo.maths.sde import ode_step

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 2, 4, 4, generator=generator)
    sigmas = torch.tensor([1.0, 0.6, 0.25, 0.0])

    def velocity_fn(x, sigma, rows):
        return torch.tanh(x) * (1 + sigma) + rows.view(-1, 1, 1, 1)

    expected = latents
    rows = torch.arange(3)
    for here, there in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        expected = ode_step(velocity_fn(expected, here, rows), expected, here, there)
    torch.testing.assert_close(ode_sample(velocity_fn, latents, sigmas), expected)
    torch.testing.assert_close(ode_sample(velocity_fn, latents, sigmas, max_batch=2), expected)


def test_sample_window_start_draws_from_the_generator():
    # the draw is torch.randint(lo, hi - W + 1) on the given generator, so a seed reproduces the windows
    ours, reference = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    draws = [sample_window_start(10, 3, (2, 8), ours) for _ in range(20)]
    assert draws == [int(torch.randint(2, 6, (1,), generator=reference)) for _ in range(20)]


def test_sample_window_start_at_the_smallest_sizes():
    assert sample_window_start(1, 1) == 0  # one step, one-step window
    assert sample_window_start(5, 1, (4, 5)) == 4  # a one-step window on the last step


@pytest.mark.parametrize(
    "num_steps, size, window_range, message",
    [
        (0, 1, (0, 1), r"num_steps must be >= 1"),
        (10, 3, (4, 4), r"window_range must satisfy"),  # an empty range is refused as a range, not as too short
        (10, 0, (0, 10), r"window_size must be in \[1, num_steps=10\]"),
    ],
)
def test_sample_window_start_names_the_first_bad_argument(num_steps, size, window_range, message):
    with pytest.raises(ValueError, match=message):
        sample_window_start(num_steps, size, window_range)


class RowRecorder:
    """Velocity that depends on the image row and records the rows of every call."""

    def __init__(self):
        self.rows: list[list[int]] = []

    def __call__(self, latents: torch.Tensor, sigma: float, rows: torch.Tensor) -> torch.Tensor:
        self.rows.append(rows.tolist())
        return torch.tanh(latents) * (1 + sigma) + rows.view(-1, 1, 1, 1).float()


@pytest.mark.parametrize("implementation", [rollout_sequential, rollout])
def test_every_latent_gets_its_own_image_row(implementation):
    # more images (5) than channels (2); T = 4, s = 0, W = 2: the engine evaluates the main trajectory
    # with every completion due at a step in one call, so each call's rows are 0..4 repeated
    velocity_fn = RowRecorder()
    latents = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = implementation(velocity_fn, latents, shifted_sigmas(4), 0, 2, step_kind("cps", 0.7), generator=torch.Generator().manual_seed(1))
    assert all(rows == list(range(5)) * (len(rows) // 5) and len(rows) % 5 == 0 for rows in velocity_fn.rows)
    assert out.final_latents.shape == (5, 3, 2, 3, 3)


@pytest.mark.parametrize("implementation, nfe", [(rollout_sequential, 4 + 4 + 3), (rollout, 4 + 3 + 2)])
def test_one_image_counts_its_evaluations(implementation, nfe):
    # T = 4, s = 0, W = 2. Sequential: main 4 + baseline 4 + branch k=1 (4 - 1) = 11.
    # Engine: main 4 + baseline (4 - 1) + branch (4 - 1 - 1) = 9, each completion's first step reused.
    latents = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    out = implementation(RowRecorder(), latents, shifted_sigmas(4), 0, 2, step_kind("cps", 0.7), generator=torch.Generator().manual_seed(1))
    assert out.nfe_per_image == nfe and type(out.nfe_per_image) is int


def test_a_single_step_rollout():
    # T = 1, W = 1 ("sde" at σ = 1 takes the next sigma in the denominator): main and baseline, one step each
    reference, engine, _, _ = run_both(1, 0, 1, noise_level=0.7, kind="sde")
    assert_same_rollout(reference, engine)
    assert engine.final_latents.shape == (BATCH, 2, CHANNELS, SIZE, SIZE)
    assert (engine.nfe_per_image, reference.nfe_per_image) == (1, 2)


def test_minimum_nfe_refuses_zero_steps():
    with pytest.raises(ValueError, match="at least one step"):
        minimum_nfe(0, 0, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(sigmas=torch.tensor([1.0])), r"1-D tensor of T\+1 >= 2"),
        (dict(sigmas=torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])), r"1-D tensor of T\+1 >= 2"),
        (dict(sigmas=torch.tensor([1.0, 0.5, 0.5, 0.0])), "strictly decreasing"),  # a repeated sigma
        (dict(window_start=2, window_size=2), "does not fit"),  # steps 2, 3 of T = 3: one too far
    ],
)
@pytest.mark.parametrize("implementation", [rollout_sequential, rollout])
def test_rollouts_reject_bad_sigmas_and_windows(implementation, change, message):
    with pytest.raises(ValueError, match=message):
        implementation(**rollout_arguments(3, 1, change))


def test_both_implementations_record_their_settings_in_float32():
    sigmas = shifted_sigmas(6).double()
    for implementation in (rollout_sequential, rollout):
        out = implementation(
            ToyVelocity(), initial_latents(), sigmas, 1, 3, step_kind("cps", 0.7), generator=torch.Generator().manual_seed(0), branch_steps=2
        )
        assert out.sigmas.dtype == torch.float32 and out.branch_steps == 2


def test_window_noise_is_drawn_in_float32_under_another_default_dtype():
    # Lightning's "-true" precisions change the default dtype inside a step; the generator's draw must not follow it
    velocity_fn, latents, sigmas = ToyVelocity(), initial_latents(), shifted_sigmas(5)
    step_noise = torch.randn((BATCH, 3, CHANNELS, SIZE, SIZE), generator=torch.Generator().manual_seed(9))
    given = rollout(velocity_fn, latents, sigmas, 1, 3, step_kind("cps", 0.7), step_noise=step_noise)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        drawn = rollout(velocity_fn, latents, sigmas, 1, 3, step_kind("cps", 0.7), generator=torch.Generator().manual_seed(9))
    finally:
        torch.set_default_dtype(previous)
    assert_same_rollout(drawn, given)
