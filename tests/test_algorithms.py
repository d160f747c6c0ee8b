"""The algorithms apart from any trainer (tpgrpo/algorithms/): the registry, the update plan, GRPO's
batched loss and DiffusionNFT's loss against a hand-written formula."""
import pytest
import torch

from tpgrpo.algorithms import ALGORITHMS, RolloutBatch, plan_update, transition_pairs
from tpgrpo.distributed import Collectives
from tpgrpo.lora import lora_parameters

CIRCLE = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
SQUARES = {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": "a photo of two squares"}


def test_transition_pairs_are_transition_major():
    rows, transitions = transition_pairs(torch.tensor([4, 7]), [0, 2, 3])
    assert rows.tolist() == [4, 7, 4, 7, 4, 7]
    assert transitions.tolist() == [0, 0, 2, 2, 3, 3]


def two_ranks(other_images: int, other_calls: int) -> Collectives:
    """Rank 0 of two, whose other rank has ``other_images`` images in each step and makes ``other_calls`` calls."""
    return Collectives(rank=0, world_size=2, max=lambda value: max(value, other_calls), sum=lambda value: value + other_images)


@pytest.mark.parametrize("limit, sizes", [(None, [6]), (4, [4, 2]), (2, [2, 2, 2]), (100, [6])])
def test_the_plan_splits_a_micro_batch_into_calls_of_at_most_the_limit(limit, sizes):
    active = torch.tensor([False, True, False, True])
    (plan,) = plan_update(active, torch.zeros(4, dtype=torch.long), 1, [0, 1, 2], None, limit, Collectives())
    assert [call.rows.numel() for call in plan.calls] == sizes and plan.images_on_all_ranks == 2
    joined = sorted(zip(torch.cat([c.rows for c in plan.calls]).tolist(), torch.cat([c.units for c in plan.calls]).tolist()))
    assert joined == sorted((r, t) for r in (1, 3) for t in (0, 1, 2))  # every pair once
    # the step's loss is the mean over its 2 images and 3 transitions: weights are pairs / 6
    assert [call.weight for call in plan.calls] == [n / 6 for n in sizes]


def test_the_plan_parts_micro_batches_and_padding_by_hand():
    active = torch.tensor([True, True, True, False, True])
    part_of = torch.tensor([0, 1, 0, 0, 0])
    # two ranks: the other has 3 images in every step and makes 4 calls
    plans = plan_update(active, part_of, 3, [0, 1], micro_batch=2, max_pairs_per_call=None, comm=two_ranks(3, 4))
    first, second, third = plans
    assert first.images_on_all_ranks == 3 + 3 and second.images_on_all_ranks == 1 + 3 and third.images_on_all_ranks == 3
    # step 0: rows 0, 2, 4 in micro-batches [0, 2] and [4], each one call over both transitions
    assert [c.rows.tolist() for c in first.calls[:2]] == [[0, 2, 0, 2], [4, 4]]
    assert [c.units.tolist() for c in first.calls[:2]] == [[0, 0, 1, 1], [0, 1]]
    # weight = pairs / (images on all ranks · transitions) · world size
    assert [c.weight for c in first.calls[:2]] == [4 / 6 / 2 * 2, 2 / 6 / 2 * 2]
    assert len(first.calls) == 4 and all(c.padding for c in first.calls[2:])  # padded to the other rank's 4 calls
    assert second.calls[0].rows.tolist() == [1, 1] and second.calls[0].weight == 2 / 4 / 2 * 2
    assert len(third.calls) == 4 and all(c.padding for c in third.calls)  # no image here; the other rank's 3 train


def test_the_registry_names_three_algorithms_and_refuses_others(tiny_model_dir):
    from tpgrpo.errors import UserInputError
    from tpgrpo.training.module import TPGRPOModule

    assert {"tp-grpo", "flow-grpo", "diffusion-nft"} <= set(ALGORITHMS)
    assert ALGORITHMS["tp-grpo"].defaults == {"default_credit": "tp"}
    assert ALGORITHMS["flow-grpo"].defaults == {"default_credit": "outcome"}
    with pytest.raises(UserInputError, match="algorithm must be one of .*'diffusion-nft'.* got 'ppo'"):
        TPGRPOModule(pretrained_path=str(tiny_model_dir), algorithm="ppo")
    with pytest.raises(UserInputError, match="credit.method applies to tp-grpo and flow-grpo, not diffusion-nft"):
        TPGRPOModule(pretrained_path=str(tiny_model_dir), algorithm="diffusion-nft", credit={"method": "tp"})
    flow = TPGRPOModule(pretrained_path=str(tiny_model_dir), algorithm="flow-grpo").algorithm
    assert flow.rule.name == "outcome" and not flow.rule.needs_branches


def test_one_process_collectives_are_the_identity():
    comm = Collectives()
    value = torch.arange(3.0)
    assert (comm.rank, comm.world_size) == (0, 1)
    assert comm.gather_rows(value) is value and comm.max(2.5) == 2.5 and comm.sum(4) == 4
    assert Collectives.from_process_group() == Collectives()  # torch.distributed is not initialised here


@pytest.fixture(scope="module")
def collected(tiny_model_dir):
    """A module with a non-zero LoRA (so every LoRA weight gets a gradient), KL on, and one rollout batch."""
    from tpgrpo.training.module import TPGRPOModule

    torch.manual_seed(0)
    model = TPGRPOModule(
        pretrained_path=str(tiny_model_dir), rewards={"jpeg_incompressibility": 1.0},
        sampling={"num_steps": 4, "window_size": 3}, update={"kl_beta": 0.1, "clip_range": 0.2},
    )
    with torch.no_grad():
        for p in lora_parameters(model.transformer):
            p.add_(0.02 * torch.randn_like(p))
    batch = {"prompts": [CIRCLE["prompt"]] * 3 + [SQUARES["prompt"]] * 3, "metadata": [CIRCLE] * 3 + [SQUARES] * 3,
             "group_ids": torch.tensor([0, 0, 0, 1, 1, 1])}
    return model, model.collect(batch, "test_step")


def _loss_and_gradient(model, loss_of):
    params = lora_parameters(model.transformer)
    for p in params:
        p.grad = None
    loss = loss_of()
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in params])
    for p in params:
        p.grad = None
    return loss.detach(), gradient


def test_the_batched_loss_equals_the_loop_over_transitions(collected):
    """One call over all (image, transition) pairs gives the mean of the per-transition losses,
    and the same LoRA gradients, to float tolerance (KL to the reference included)."""
    model, batch = collected
    step = model.algorithm
    rows = torch.tensor([0, 2, 3, 5])
    transitions = step.trained_units(batch)
    assert transitions == [0, 1, 2]
    batched_loss, batched_grad = _loss_and_gradient(model, lambda: step.loss(batch, *transition_pairs(rows, transitions))[0])
    loop_loss, loop_grad = _loss_and_gradient(
        model, lambda: sum(step.loss(batch, *transition_pairs(rows, [t]))[0] for t in transitions) / len(transitions)
    )
    torch.testing.assert_close(batched_loss, loop_loss, rtol=1e-5, atol=1e-7)
    # elements near zero carry float summation-order noise (batched kernels sum in another
    # order on some CPUs), so the absolute tolerance scales with the gradient's largest entry
    scale = loop_grad.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(batched_grad, loop_grad, rtol=1e-4, atol=1e-5 * scale)
    _, metrics = step.loss(batch, *transition_pairs(rows, transitions))
    assert metrics["kl"] > 0  # the LoRA moved the policy away from the reference
    assert float(metrics["log_prob_diff"]) < 1e-3  # rollout and update compute the same transitions


def test_rollout_batch_fields_and_replacing_advantages(collected):
    _, batch = collected
    assert isinstance(batch, RolloutBatch) and len(batch) == 6
    assert batch.rewards.shape == (6, 4) and batch.step_rewards.shape == batch.advantages.shape == (6, 3)
    assert batch.images.shape == (6, 3, 32, 32) and batch.prompts[3] == SQUARES["prompt"]
    torch.testing.assert_close(batch.final_rewards, batch.rewards[:, -1])
    swapped = batch.with_advantages(torch.zeros(6, 3))
    assert swapped.advantages.abs().sum() == 0 and swapped.rollout is batch.rollout
    with pytest.raises(ValueError, match=r"advantages must have shape \(6, 3\), got \(6,\)"):
        batch.with_advantages(torch.zeros(6))


# ------------------------------------------------------------------------------ DiffusionNFT
def test_optimality_maps_clipped_advantages_to_unit_interval():
    from tpgrpo.algorithms.nft import optimality

    values = optimality(torch.tensor([5.0, -5.0, 0.0, 2.5, 9.0, -1.25]), clip=5.0)
    assert values.tolist() == [1.0, 0.0, 0.5, 0.75, 1.0, 0.375]


def _by_hand(velocity, old, noisy, clean, sigma, r, beta):
    """DiffusionNFT's per-sample loss written out sample by sample."""
    out = []
    for i in range(velocity.shape[0]):
        terms = []
        for v in (beta * velocity[i] + (1 - beta) * old[i], (1 + beta) * old[i] - beta * velocity[i]):
            error = noisy[i] - sigma[i] * v - clean[i]
            terms.append((error**2).mean() / error.detach().abs().mean())
        out.append((r[i] * terms[0] + (1 - r[i]) * terms[1]) / beta)
    return torch.stack(out)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_nft_loss_matches_the_formula_and_its_gradient_at_the_old_policy(beta):
    from tpgrpo.algorithms.nft import nft_loss

    g = torch.Generator().manual_seed(0)
    old, clean, noise = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    sigma = torch.tensor([0.9, 0.6, 0.3, 0.1])
    noisy = (1 - sigma.view(-1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1) * noise
    r = torch.tensor([1.0, 0.0, 0.5, 0.8])
    velocity = (old + 0.1 * torch.randn(4, 2, 3, 3, generator=g)).requires_grad_()
    torch.testing.assert_close(nft_loss(velocity, old, noisy, clean, sigma, r, beta), _by_hand(velocity, old, noisy, clean, sigma, r, beta))
    # at v = v_old both implicit policies are v_old: the gradient is (2r - 1) times plain regression's
    # towards x0, whatever beta (r = 1 regresses, r = 0 pushes away, r = 1/2 leaves the policy)
    at_old = old.clone().requires_grad_()
    (grad,) = torch.autograd.grad(nft_loss(at_old, old, noisy, clean, sigma, r, beta).sum(), at_old)
    plain = at_old.detach().clone().requires_grad_()
    (regress,) = torch.autograd.grad(_by_hand(plain, plain.detach(), noisy, clean, sigma, torch.ones(4), 1.0).sum(), plain)
    torch.testing.assert_close(grad, (2 * r - 1).view(-1, 1, 1, 1) * regress)
    assert grad[2].abs().max() < 1e-6 * regress[2].abs().max()


@pytest.fixture(scope="module")
def nft_collected(tiny_model_dir):
    from tpgrpo.training.module import TPGRPOModule

    torch.manual_seed(0)
    model = TPGRPOModule(
        pretrained_path=str(tiny_model_dir), algorithm="diffusion-nft", rewards={"jpeg_incompressibility": 1.0},
        sampling={"num_steps": 4, "window_size": 2, "window_range": [0, 3]}, update={"kl_beta": 0.1},
    )
    batch = {"prompts": [CIRCLE["prompt"]] * 3 + [SQUARES["prompt"]] * 3, "metadata": [CIRCLE] * 3 + [SQUARES] * 3,
             "group_ids": torch.tensor([0, 0, 0, 1, 1, 1])}
    return model, model.collect(batch, "test_nft")


def test_nft_batch_holds_clean_latents_times_noise_and_old_velocities(nft_collected):
    from tpgrpo.maths import credit

    model, batch = nft_collected
    sigmas = model.flow.sigmas(4, model.sampling.resolution)
    torch.testing.assert_close(batch.sigmas, sigmas[:-1])  # every noise level of the sampler
    assert batch.clean.shape == (6, *model.flow.latent_shape(model.sampling.resolution))
    assert batch.noise.shape == batch.old_velocity.shape == (6, 4, *batch.clean.shape[1:])
    assert batch.rewards.shape == (6, 1) and batch.images.shape == (6, 3, 32, 32)
    expected = credit.group_advantages(batch.rewards, batch.group_ids, clip=model.credit.advantage_clip)
    torch.testing.assert_close(batch.advantages, expected.expand(-1, 4))
    # the old velocity is the sampling policy's at x_σ = (1 - σ) x0 + σ ε
    rows, units = torch.tensor([1, 4]), torch.tensor([0, 3])
    noisy = batch.noisy(rows, units)
    sigma = batch.sigmas[units].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * batch.clean[rows] + sigma * batch.noise[rows, units])
    with torch.no_grad():
        velocity = model.algorithm.velocity_fn(batch.cond, model.nft.guidance_scale)(noisy, batch.sigmas[units], rows)
    torch.testing.assert_close(velocity, batch.old_velocity[rows, units], rtol=1e-5, atol=1e-6)
    assert model.algorithm.trained_rows(batch).all()  # zero advantages still train (r = 1/2)


def test_nft_loss_of_a_call_is_the_formula_over_its_pairs(nft_collected):
    from tpgrpo.algorithms.nft import optimality

    model, batch = nft_collected
    rows, units = torch.tensor([0, 2, 5, 5]), torch.tensor([0, 1, 2, 3])
    loss, metrics = model.algorithm.loss(batch, rows, units)
    noisy = batch.noisy(rows, units)
    with torch.no_grad():
        velocity = model.algorithm.velocity_fn(batch.cond, model.nft.guidance_scale)(noisy, batch.sigmas[units], rows)
    r = optimality(batch.advantages[rows, units], 5.0)
    by_hand = 5.0 * _by_hand(velocity, batch.old_velocity[rows, units], noisy, batch.clean[rows], batch.sigmas[units], r, 1.0).mean()
    # the LoRA starts at zero: the policy is the reference, so the KL term is 0
    torch.testing.assert_close(loss.detach(), by_hand, rtol=1e-4, atol=1e-6)
    assert float(metrics["kl"]) == 0.0 and float(metrics["old_deviation"]) < 1e-10
