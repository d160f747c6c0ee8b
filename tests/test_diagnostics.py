"""Policy-gradient agreement diagnostics (tpgrpo/algorithms/diagnostics.py, benchmarks/gradient_snr.py)."""
import math

import pytest
import torch

from tpgrpo.algorithms import transition_pairs
from tpgrpo.algorithms.diagnostics import (
    cosines_by_part,
    lora_module_kind,
    pairwise_cosines,
    policy_gradient,
    reward_spread,
    signal_to_noise,
)


def test_pairwise_cosines_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    cosines = pairwise_cosines([e1, e1 + e2, -e1])  # pairs (0,1), (0,2), (1,2)
    torch.testing.assert_close(cosines, torch.tensor([1 / math.sqrt(2), -1.0, -1 / math.sqrt(2)]))
    with pytest.raises(ValueError, match="at least two"):
        pairwise_cosines([e1])


def test_cosine_of_noisy_estimates_matches_the_signal_share():
    """Estimates g + noise with |g|² = 1 and E|noise|² = 1 agree with cosine ≈ 1 / (1 + 1) = 0.5."""
    generator = torch.Generator().manual_seed(0)
    dims = 200_000
    signal = torch.zeros(dims)
    signal[0] = 1.0
    estimates = [signal + torch.randn(dims, generator=generator) / math.sqrt(dims) for _ in range(6)]
    assert abs(float(pairwise_cosines(estimates).mean()) - 0.5) < 0.02


def test_signal_to_noise_from_cosine():
    assert signal_to_noise(0.5, 100) == {"snr_per_image": pytest.approx(0.01), "images_for_half_signal": pytest.approx(100)}
    # c = 0.2 at n = 64: SNR per image 0.25 / 64; 64 * 0.8 / 0.2 = 256 images for cosine 0.5
    assert signal_to_noise(0.2, 64) == {"snr_per_image": pytest.approx(0.25 / 64), "images_for_half_signal": pytest.approx(256)}
    assert signal_to_noise(-0.01, 64) == {"snr_per_image": 0.0, "images_for_half_signal": math.inf}
    with pytest.raises(ValueError, match="images"):
        signal_to_noise(0.5, 0)


def test_cosines_by_part_restricts_to_each_part():
    names = ["a", "b", "c"]
    sizes = [2, 1, 1]
    first = torch.tensor([1.0, 2.0, 3.0, 0.0])
    second = torch.tensor([2.0, 4.0, -3.0, 0.0])
    parts = cosines_by_part([first, second], names, sizes, lambda name: name)
    assert parts["a"] == pytest.approx(1.0) and parts["b"] == pytest.approx(-1.0) and math.isnan(parts["c"])
    grouped = cosines_by_part([first, second], names, sizes, lambda name: "ab" if name in "ab" else name)
    assert grouped["ab"] == pytest.approx(float(torch.nn.functional.cosine_similarity(first[:3], second[:3], dim=0)))
    with pytest.raises(ValueError, match="describe"):
        cosines_by_part([first, second], names, [1, 1, 1], lambda name: name)


def test_reward_spread_by_hand():
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.5, 0.2, 0.2])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    spread = reward_spread(rewards, groups)
    assert spread["within_group_std"] == pytest.approx((0.5 + 0 + 0) / 3)
    means = torch.tensor([0.5, 0.5, 0.2])
    assert spread["between_group_std"] == pytest.approx(float(((means - means.mean()) ** 2).mean().sqrt()))
    assert spread["groups_all_equal"] == pytest.approx(2 / 3)


def test_lora_module_kind_drops_block_index_and_adapter_name():
    assert lora_module_kind("transformer_blocks.3.attn.add_v_proj.lora_B.default.weight") == "attn.add_v_proj.lora_B"
    assert lora_module_kind("single_transformer_blocks.10.attn.to_q.lora_A.default.weight") == "attn.to_q.lora_A"


def test_policy_gradient_is_the_gradient_of_the_first_step_loss(tiny_model_dir):
    """Per transition; linear in the advantages; a small step against it lowers the loss by ≈ step·|g|²."""
    from tpgrpo.lora import lora_parameters
    from tpgrpo.training.module import TPGRPOModule

    torch.manual_seed(0)
    model = TPGRPOModule(
        pretrained_path=str(tiny_model_dir), sampling={"num_steps": 3, "window_size": 2}, update={"kl_beta": 0.0, "clip_range": 0.2}
    )
    params = lora_parameters(model.transformer)
    with torch.no_grad():  # a non-zero LoRA B, so every LoRA weight has a gradient
        for p in params:
            p.add_(0.01 * torch.randn_like(p))
    group_ids = torch.tensor([0, 0, 1, 1])
    circle = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    squares = {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": "a photo of two squares"}
    batch = {"prompts": [circle["prompt"]] * 2 + [squares["prompt"]] * 2, "metadata": [circle] * 2 + [squares] * 2,
             "group_ids": group_ids}
    collected = model.collect(batch, "test")
    advantages = torch.tensor([[1.0, -0.5], [-1.0, 0.5], [0.0, 0.0], [0.3, -0.3]])

    gradients = policy_gradient(model, collected, advantages)
    size = sum(p.numel() for p in params)
    assert len(gradients) == 2 and all(g.shape == (size,) for g in gradients)
    assert all(p.grad is None for p in params)
    negated = policy_gradient(model, collected, -advantages)
    for g, n in zip(gradients, negated):
        torch.testing.assert_close(n, -g)
    assert all(float(g.abs().sum()) == 0 for g in policy_gradient(model, collected, torch.zeros_like(advantages)))

    def loss() -> float:
        rows = torch.tensor([0, 1, 3])  # row 2 has no advantage and is dropped
        with torch.no_grad():
            return sum(
                # the first optimizer step's loss: the mean over 3 active images and 2 transitions
                float(model.algorithm.loss(collected.with_advantages(advantages), *transition_pairs(rows, [t]))[0]) / 2
                for t in range(2)
            )

    total = sum(gradients)
    before, step = loss(), 1e-2 / float(total.norm())
    with torch.no_grad():
        offset = 0
        for p in params:
            p.sub_(step * total[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    assert loss() - before == pytest.approx(-step * float(total.norm()) ** 2, rel=0.1)


def test_gradient_snr_benchmark_measures_the_shipped_model(tmp_path):
    """benchmarks/gradient_snr.py on 2 prompts × 2 images: one cosine per pair, per transition and module kind."""
    import argparse

    from benchmarks.gradient_snr import measure, summary_line

    args = argparse.Namespace(config="configs/tiny.yaml", prompts=2, batches=3, seed=0, tag="counting", threads=None,
                              out=str(tmp_path))
    result = measure(args, ["--data.group_size=2", "--model.sampling.num_steps=3", "--model.sampling.window_range=[0,2]"])
    assert result["images_per_batch"] == 4
    assert -1 <= result["cosine"] <= 1 and -1 <= result["noise_floor"] <= 1
    assert len(result["cosine_by_transition"]) == 2 and len(result["train_reward"]) == 3
    modules = result["cosine_by_module"]
    assert math.isnan(modules["attn.to_q.lora_A"])  # B starts at zero, so A has no gradient yet
    assert all(-1 <= modules[k] <= 1 for k in modules if k.endswith("lora_B"))
    assert "policy-gradient cosine" in summary_line(result)
    spread = result["reward_spread"]
    assert spread["within_group_std"] >= 0 and 0 <= spread["groups_all_equal"] <= 1
    args.tag, args.prompts = "single_object", 3  # data/shapes/train.jsonl has 2 single-object prompts
    with pytest.raises(SystemExit, match="more than the 2 training prompts with tag 'single_object'"):
        measure(args, [])

