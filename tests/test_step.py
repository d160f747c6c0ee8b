"""The trainer-agnostic GRPO step (tpgrpo/step.py): pairs, calls, the batched loss and its collectives."""
import pytest
import torch

from tpgrpo.distributed import Collectives
from tpgrpo.lora import lora_parameters
from tpgrpo.step import GRPOStep, RolloutBatch, transition_pairs

CIRCLE = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
SQUARES = {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": "a photo of two squares"}


def test_transition_pairs_are_transition_major():
    rows, transitions = transition_pairs(torch.tensor([4, 7]), [0, 2, 3])
    assert rows.tolist() == [4, 7, 4, 7, 4, 7]
    assert transitions.tolist() == [0, 0, 2, 2, 3, 3]


@pytest.mark.parametrize("limit, sizes", [(None, [6]), (4, [4, 2]), (2, [2, 2, 2]), (100, [6])])
def test_loss_calls_split_a_micro_batch_into_calls_of_at_most_the_limit(limit, sizes):
    from tpgrpo.settings import UpdateConfig

    step = GRPOStep.__new__(GRPOStep)  # loss_calls reads only the update settings
    step.update = UpdateConfig(max_latents_per_call=limit)
    calls = step.loss_calls(torch.tensor([1, 3]), [0, 1, 2])
    assert [rows.numel() for rows, _ in calls] == sizes
    joined = sorted(zip(torch.cat([r for r, _ in calls]).tolist(), torch.cat([t for _, t in calls]).tolist()))
    assert joined == sorted((r, t) for r in (1, 3) for t in (0, 1, 2))  # every pair once


def test_one_process_collectives_are_the_identity():
    comm = Collectives()
    value = torch.arange(3.0)
    assert (comm.rank, comm.world_size) == (0, 1)
    assert comm.gather_rows(value) is value and comm.max(2.5) == 2.5 and comm.sum(4) == 4
    assert Collectives.from_process_group() == Collectives()  # torch.distributed is not initialised here


@pytest.fixture(scope="module")
def collected(tiny_model_dir):
    """A module with a non-zero LoRA (so every LoRA weight gets a gradient), KL on, and one rollout batch."""
    from tpgrpo.module import TPGRPOModule

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
    step = model.grpo
    rows = torch.tensor([0, 2, 3, 5])
    transitions = step.trained_transitions(batch.rollout)
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
