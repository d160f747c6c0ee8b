"""How much learning signal a rollout batch carries: policy gradients and their agreement.

Two independent rollout batches of the same prompts give two estimates of the policy gradient.
Their cosine ``c`` tells how much of one estimate is signal: for estimates of ``n`` images each,
``c ≈ |g|² / (|g|² + σ²/n)`` (``g`` the true gradient, ``σ²`` the per-image variance), so
``c / (1 - c) / n`` is the signal-to-noise ratio of one image and ``n (1 - c) / c`` the images a
gradient needs before half of it is signal. Shuffling the advantages over the batch destroys
the signal and keeps the noise: its cosines are the noise floor of the measurement.
"""
from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tpgrpo.algorithms import RolloutBatch
from tpgrpo.lora import lora_parameters


def policy_gradient(module: Any, batch: RolloutBatch, advantages: Tensor | None = None) -> list[Tensor]:
    """Gradient of the first optimizer step's loss over all active images, one flat tensor per trained transition.

    ``module`` is a `tpgrpo.training.module.TPGRPOModule`, ``batch`` what its ``collect`` returned;
    ``advantages`` (N, W) replaces the batch's (e.g. shuffled, for the noise floor). The loss is the
    one the update takes in a single optimizer step, weighted as the algorithm's plan weights it
    (`tpgrpo.algorithms.plan_update`: a mean over the active images and the transitions), split by
    transition, so the tensors add up to that step's gradient. At the first step the ratio is
    exactly 1, so this is the plain policy gradient of spec §4. Each tensor concatenates the
    gradients of `tpgrpo.lora.named_lora_parameters`, in that order. The LoRA gradients are left cleared.
    """
    algorithm = module.algorithm
    if advantages is not None:
        batch = batch.with_advantages(advantages)
    params = lora_parameters(module.transformer)
    (plan,) = algorithm.plan(batch, 1)
    gradients = []
    for index in algorithm.trained_units(batch):
        for param in params:
            param.grad = None
        for call in plan.calls:
            chosen = call.units == index
            if call.padding or not chosen.any():
                continue
            loss, _ = algorithm.loss(batch, call.rows[chosen], call.units[chosen])
            (loss * call.weight * int(chosen.sum()) / call.rows.numel()).backward()
        gradients.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().float() for p in params
        ]))
    for param in params:
        param.grad = None
    return gradients


def pairwise_cosines(vectors: Sequence[Tensor]) -> Tensor:
    """Cosine similarity of every pair of 1-D tensors (in ``itertools.combinations`` order), (K·(K-1)/2,)."""
    if len(vectors) < 2:
        raise ValueError(f"need at least two vectors, got {len(vectors)}")
    pairs = [torch.nn.functional.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(vectors, 2)]
    return torch.stack(pairs)


def signal_to_noise(cosine: float, images: int) -> dict[str, float]:
    """Per-image signal-to-noise ratio and the images needed for a half-signal gradient, from a mean cosine.

    Non-positive cosines (no measurable signal) give 0 and infinity.
    """
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    if cosine <= 0:
        return {"snr_per_image": 0.0, "images_for_half_signal": math.inf}
    cosine = min(cosine, 1 - 1e-9)
    return {"snr_per_image": cosine / (1 - cosine) / images, "images_for_half_signal": images * (1 - cosine) / cosine}


def reward_spread(rewards: Tensor, group_ids: Tensor) -> dict[str, float]:
    """How rewards (N,) spread within groups (same prompt) and between the groups' means.

    Returns the mean within-group population std, the std of the group means, and the share of
    groups whose rewards are all equal (their advantages are all zero).
    """
    groups = [rewards[group_ids == g] for g in group_ids.unique()]
    within = torch.stack([r.std(unbiased=False) for r in groups])
    means = torch.stack([r.mean() for r in groups])
    return {
        "within_group_std": float(within.mean()),
        "between_group_std": float(means.std(unbiased=False)),
        "groups_all_equal": float((within == 0).float().mean()),
    }


def lora_module_kind(name: str) -> str:
    """``transformer_blocks.3.attn.add_v_proj.lora_B.default.weight`` -> ``attn.add_v_proj.lora_B``."""
    return re.sub(r"^(single_)?transformer_blocks\.\d+\.", "", name).replace(".default.weight", "")


def cosines_by_part(
    gradients: Sequence[Tensor], names: Sequence[str], sizes: Sequence[int], part_of: Callable[[str], str]
) -> dict[str, float]:
    """Mean pairwise cosine of the gradients restricted to each part of the parameters.

    ``names`` and ``sizes`` describe the parameters concatenated in each gradient, in order;
    ``part_of(name)`` names the part a parameter belongs to. Parts whose gradients are all zero
    (LoRA A matrices while B is still zero) get NaN.
    """
    if sum(sizes) != gradients[0].numel() or len(names) != len(sizes):
        raise ValueError("names and sizes must describe the gradient vectors")
    spans: dict[str, list[Tensor]] = defaultdict(list)
    offset = 0
    for name, size in zip(names, sizes):
        spans[part_of(name)].append(torch.arange(offset, offset + size))
        offset += size
    out = {}
    for part, pieces in spans.items():
        index = torch.cat(pieces)
        chosen = [g[index] for g in gradients]
        if all(float(c.abs().sum()) == 0.0 for c in chosen):
            out[part] = math.nan
        else:
            out[part] = float(pairwise_cosines(chosen).mean())
    return out
