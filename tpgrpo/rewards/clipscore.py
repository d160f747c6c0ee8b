"""CLIP score (Hessel et al., 2021) as torchmetrics' ``CLIPScore`` defines it, per image, in [0, 1].

torchmetrics defines CLIPScore(I, C) = max(100 · cos(E_I, E_C), 0). This reward returns that
divided by 100, i.e. max(cos, 0) in [0, 1]. (Flow-GRPO's own ``clip_scorer`` returns
exp(logit_scale) · cos / 30 instead; that is not this reward.)

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

from tpgrpo.rewards.base import register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, freeze, image_text_cosine, load_pretrained

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


@register_reward("clipscore")
class ClipScore(FrozenModelReward):
    """max(cos(image, prompt), 0) per image, torchmetrics' CLIP score / 100.

    Option: ``model``, a folder or hub id holding both the CLIP model and its ``CLIPProcessor``.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL):
        super().__init__()

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
        """{"clipscore": (B,) in [0, 1]} for images (B, 3, H, W) in [0, 1] and their B prompts."""
        self.follow(images)
        cosine = image_text_cosine(self.model, self.processor, images, prompts)
        return {self.name: cosine.clamp_min(0).to(images.device)}
