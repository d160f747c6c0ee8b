"""Checks of the stochastic steps (spec §1) against independent formulas."""
import math

import pytest
import torch

from tpgrpo.maths.sde import kl_to_reference, ode_step, sde_step, step_kind


def _state(batch=4, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 4, 4, generator=generator).to(dtype)
    v = torch.randn(batch, 3, 4, 4, generator=generator).to(dtype)
    return x, v


def test_sde_log_prob_matches_gaussian_density():
    x, v = _state()
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    generator = torch.Generator().manual_seed(1)
    sample, log_prob, mean = sde_step(v, x, sigma, sigma_next, step_kind("sde", a), generator=generator)
    std = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    expected_mean = x * (1 + std**2 * dt / (2 * sigma)) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    torch.testing.assert_close(mean, expected_mean)
    density = torch.distributions.Normal(expected_mean, std * math.sqrt(-dt)).log_prob(sample)
    torch.testing.assert_close(log_prob, density.mean(dim=(1, 2, 3)))
    assert log_prob.shape == (4,)


def test_cps_mean_and_log_prob_by_hand():
    x, v = _state()
    sigma, sigma_next, a = 0.9, 0.5, 0.7
    noise = torch.randn_like(x)
    sample, log_prob, mean = sde_step(v, x, sigma, sigma_next, step_kind("cps", a), noise=noise)
    std = sigma_next * math.sin(a * math.pi / 2)
    clean, pure_noise = x - sigma * v, x + (1 - sigma) * v
    expected_mean = (1 - sigma_next) * clean + math.sqrt(sigma_next**2 - std**2) * pure_noise
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(sample, expected_mean + std * noise)
    torch.testing.assert_close(log_prob, -(std * noise).pow(2).mean(dim=(1, 2, 3)))


def test_cps_preserves_the_noise_coefficient():
    # with the exact velocity v = ε - x0 the next state is (1-σ')·x0 + σ'-scaled unit noise
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(20000, 1, generator=generator)
    eps = torch.randn(20000, 1, generator=generator)
    sigma, sigma_next = 0.7, 0.4
    x = (1 - sigma) * x0 + sigma * eps
    nxt, _, _ = sde_step(eps - x0, x, sigma, sigma_next, step_kind("cps", 0.9), generator=generator)
    residual = nxt - (1 - sigma_next) * x0
    assert float(residual.std()) == pytest.approx(sigma_next, rel=0.03)


@pytest.mark.parametrize("kind", ["cps", "sde"])
def test_zero_noise_is_the_euler_step(kind):
    x, v = _state()
    sample, log_prob, mean = sde_step(v, x, 0.6, 0.3, step_kind(kind, 0.0))
    torch.testing.assert_close(sample, x + v * (0.3 - 0.6))
    torch.testing.assert_close(mean, sample)
    torch.testing.assert_close(ode_step(v, x, 0.6, 0.3), sample)
    assert torch.equal(log_prob, torch.zeros(4))


@pytest.mark.parametrize("kind", ["cps", "sde"])
def test_stored_transition_is_returned_unchanged_and_scored_in_float32(kind):
    x, v = _state(dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    sample, log_prob, _ = sde_step(v.float(), x.float(), 0.7, 0.5, step_kind(kind, 0.7), generator=generator)
    again, log_prob_again, mean = sde_step(v, x, 0.7, 0.5, step_kind(kind, 0.7), prev_sample=sample)
    assert again is sample
    assert log_prob_again.dtype == torch.float32 and mean.dtype == torch.float32
    torch.testing.assert_close(log_prob_again, log_prob, atol=0.05, rtol=0.05)


def test_per_sample_sigmas_equal_scalar_sigmas():
    x, v = _state()
    noise = torch.randn_like(x)
    sigmas = torch.tensor([0.9, 0.7, 0.5, 0.3])
    nexts = sigmas - 0.2
    batched, lp, _ = sde_step(v, x, sigmas, nexts, step_kind("sde", 0.5), noise=noise)
    for i in range(4):
        single, lp_i, _ = sde_step(v[i : i + 1], x[i : i + 1], float(sigmas[i]), float(nexts[i]), step_kind("sde", 0.5), noise=noise[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single)
        torch.testing.assert_close(lp[i : i + 1], lp_i)


def test_sigma_one_uses_next_sigma_in_denominator():
    std = step_kind("sde", 0.7).std(torch.tensor(1.0), torch.tensor(0.9))
    assert float(std) == pytest.approx(0.7 * math.sqrt(1 / 0.1))
    x, v = _state()
    _, log_prob, _ = sde_step(v, x, 1.0, 0.9, step_kind("sde", 0.7))
    assert torch.isfinite(log_prob).all()


def test_kl_matches_formula_and_is_zero_for_equal_means():
    a = torch.randn(3, 2, 4)
    b = a + 0.5
    torch.testing.assert_close(kl_to_reference(a, b, 0.25), torch.full((3,), 0.25 / (2 * 0.0625)))
    assert torch.equal(kl_to_reference(a, a, 0.3), torch.zeros(3))
    assert torch.equal(kl_to_reference(a, b, 0.0), torch.zeros(3))


def test_bad_inputs_raise():
    x, v = _state()
    with pytest.raises(ValueError, match="kind"):
        sde_step(v, x, 0.5, 0.4, step_kind("ddim", 0.7))
    with pytest.raises(ValueError, match="shape"):
        sde_step(v[:2], x, 0.5, 0.4, step_kind("cps", 0.7))
    with pytest.raises(ValueError, match="sigma"):
        sde_step(v, x, torch.tensor([0.5, 0.4]), 0.3, step_kind("cps", 0.7))
    with pytest.raises(ValueError, match="smaller"):
        sde_step(v, x, 0.4, 0.5, step_kind("cps", 0.7))
    with pytest.raises(ValueError, match=r"noise_level of a 'cps' step must be in \[0, 1\], got 1.5"):
        step_kind("cps", 1.5)
    with pytest.raises(ValueError, match=r"noise_level of a 'sde' step must be in \[0, inf\], got -0.1"):
        step_kind("sde", -0.1)
    with pytest.raises(TypeError, match="step must be a StepKind"):
        sde_step(v, x, 0.5, 0.4, 0.7)


@pytest.mark.parametrize("kind", ["cps", "sde"])
def test_outputs_stay_float32_under_another_default_dtype(kind):
    # Lightning's "-true" precisions change the default dtype inside a step; scalars and fresh noise must not follow it
    x, v = _state()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sample, log_prob, mean = sde_step(v, x, 0.8, 0.6, step_kind(kind, 0.7), generator=torch.Generator().manual_seed(7))
        outputs = [sample, log_prob, mean, ode_step(v, x, 0.8, 0.6), step_kind(kind, 0.7).std(0.8, 0.6), kl_to_reference(x, v, 0.25)]
    finally:
        torch.set_default_dtype(previous)
    assert [t.dtype for t in outputs] == [torch.float32] * len(outputs)


@pytest.mark.parametrize("kind", ["cps", "sde"])
def test_step_std_is_float32_for_float64_sigmas(kind):
    sigma, sigma_next = torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.6], dtype=torch.float64)
    std = step_kind(kind, 0.7).std(sigma, sigma_next)
    assert std.dtype == torch.float32
    expected = 0.6 * math.sin(0.7 * math.pi / 2) if kind == "cps" else 0.7 * math.sqrt(0.8 / 0.2)
    assert float(std) == pytest.approx(expected, rel=1e-6)


def test_float64_per_sample_sigmas_give_float32_results():
    x, v = _state(batch=2)
    sigmas, nexts = torch.tensor([0.9, 0.7], dtype=torch.float64), torch.tensor([0.5, 0.4], dtype=torch.float64)
    sample, log_prob, mean = sde_step(v, x, sigmas, nexts, step_kind("cps", 0.5), noise=torch.randn_like(x))
    assert (sample.dtype, log_prob.dtype, mean.dtype) == (torch.float32,) * 3


def test_the_generator_draws_the_noise():
    x, v = _state()
    sigma, sigma_next, a = 0.9, 0.5, 0.7
    sample, _, mean = sde_step(v, x, sigma, sigma_next, step_kind("cps", a), generator=torch.Generator().manual_seed(7))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sample, mean + sigma_next * math.sin(a * math.pi / 2) * noise)


def test_cps_at_full_noise_level_keeps_only_the_clean_estimate():
    # a = 1: std = σ'·sin(π/2) = σ', so sqrt(σ'² - std²) = 0 and mean = (1 - σ')·(x - σ·v)
    x, v = _state()
    noise = torch.randn_like(x)
    sample, _, mean = sde_step(v, x, 0.9, 0.5, step_kind("cps", 1.0), noise=noise)
    torch.testing.assert_close(mean, 0.5 * (x - 0.9 * v))
    torch.testing.assert_close(sample, mean + 0.5 * noise)


def test_equal_sigmas_raise():
    x, v = _state()
    with pytest.raises(ValueError, match="smaller"):
        sde_step(v, x, 0.5, 0.5, step_kind("cps", 0.7))


def test_kl_of_a_zero_noise_step_has_zero_gradient():
    # per-sample std [0, 0.5], means 0.5 apart over 4 elements: KL = [0, 0.25 / (2·0.25)] = [0, 0.5],
    # d KL_1 / d mean = (mean - reference) / (4·0.25) = -0.5 per element; sample 0 gets exactly 0, not NaN
    reference = torch.zeros(2, 4)
    mean = torch.full((2, 4), -0.5, requires_grad=True)
    kl = kl_to_reference(mean, reference, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(kl.detach(), torch.tensor([0.0, 0.5]))
    kl.sum().backward()
    torch.testing.assert_close(mean.grad, torch.tensor([[0.0] * 4, [-0.5] * 4]))


def test_the_noise_is_drawn_in_float32_under_another_default_dtype():
    x, v = _state()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sample, _, mean = sde_step(v, x, 0.9, 0.5, step_kind("cps", 0.7), generator=torch.Generator().manual_seed(7))
    finally:
        torch.set_default_dtype(previous)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    torch.testing.assert_close(sample, mean + 0.5 * math.sin(0.7 * math.pi / 2) * noise)
