"""PickScore (Kirstain et al., 2023), scaled as Flow-GRPO's ``pickscore_scorer``.

score = exp(logit_scale) · cos(image embedding, prompt embedding) / 26, with the CLIP-H processor
of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` and the model ``yuvalkirstain/PickScore_v1``.
PickScore's exp(logit_scale) is about 100, so scores lie in [-100/26, 100/26] and typically
around 0.85 for images that fit their prompt (Flow-GRPO calls the division "norm to 0-1").
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from transformers import CLIPModel, CLIPProcessor

from tpgrpo.rewards.base import RewardConfigError, register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, freeze, image_text_cosine, load_pretrained

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@register_reward("pickscore")
class PickScore(FrozenModelReward):
    """exp(logit_scale) · cos(image, prompt) / ``scale`` per image (Flow-GRPO: ``scale`` = 26).

    Options: ``model`` (folder or hub id of the CLIP model), ``processor`` (folder or hub id of
    the ``CLIPProcessor``), ``scale``.
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        processor: str | os.PathLike = DEFAULT_PROCESSOR,
        scale: float = 26.0,
    ):
        super().__init__()
        if scale <= 0:
            raise RewardConfigError(f"pickscore: scale must be > 0, got {scale}")
        self.scale = float(scale)
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, processor, "PickScore processor")
        self.model = freeze(load_pretrained(CLIPModel.from_pretrained, model, "PickScore model"))

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"pickscore": (B,)} for images (B, 3, H, W) in [0, 1] and their B prompts."""
        self.follow(images)
        cosine = image_text_cosine(self.model, self.processor, images, prompts)
        return {self.name: (self.model.logit_scale.exp().float() * cosine / self.scale).to(images.device)}
