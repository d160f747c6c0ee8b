"""CLIP score (Hessel et al., 2021) on Flow-GRPO's scale: exp(logit_scale) · cos(image, prompt) / 30.

Flow-GRPO's (and TP-GRPO's) ``clip_scorer`` divides CLIP ViT-L/14's logit by 30; its logit scale
is 100, so the score is about 3.3 · cos, and a Flow-GRPO recipe's reward weights mean the same
here. The ``scale`` option changes the divisor: torchmetrics' ``CLIPScore`` is 100 · max(cos, 0),
that is this reward with ``scale: 1`` for images that fit their prompt at all (cos > 0).

A ``torchmetrics.multimodal.CLIPScore`` loads the model and processor; the per-image scores are
computed here from them, because the metric's ``update`` only accumulates a batch mean, and in
torchmetrics 1.9 it fails under transformers 5, whose ``get_image_features`` returns an output
object instead of a tensor.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from tpgrpo.rewards.base import RewardConfigError, register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, freeze, image_text_cosine, load_pretrained

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


@register_reward("clipscore")
class ClipScore(FrozenModelReward):
    """exp(logit_scale) · cos(image, prompt) / ``scale`` per image (Flow-GRPO: ``scale`` = 30).

    Options: ``model``, a folder or hub id holding both the CLIP model and its ``CLIPProcessor``;
    ``scale``.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, scale: float = 30.0):
        super().__init__()
        if not scale > 0:
            raise RewardConfigError(f"clipscore: scale must be > 0, got {scale}")
        self.scale = float(scale)

        def load() -> tuple[CLIPModel, CLIPProcessor]:
            return (
                load_pretrained(CLIPModel.from_pretrained, model, "CLIP score model"),
                load_pretrained(CLIPProcessor.from_pretrained, model, "CLIP score processor"),
            )

        metric = CLIPScore(model_name_or_path=load)
        self.model, self.processor = freeze(metric.model), metric.processor

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"clipscore": (B,)} for images (B, 3, H, W) in [0, 1] and their B prompts."""
        self.follow(images)
        cosine = image_text_cosine(self.model, self.processor, images, prompts)
        return {self.name: (self.model.logit_scale.exp().float() * cosine / self.scale).to(images.device)}
