"""JPEG (in)compressibility rewards of Flow-GRPO / DDPO: the file size of the JPEG-encoded image.

Scales as Flow-GRPO's ``jpeg_compressibility`` and ``jpeg_incompressibility``, so that their
recipes' reward weights mean the same here: compressibility is minus the size in kB divided by
500, incompressibility the size in kB.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import Reward, RewardConfigError, register_reward


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each (3, H, W) image in [0, 1] saved as JPEG: (B, 3, H, W) -> (B,)."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(Reward):
    """The JPEG size in kB divided by ``kilobytes_per_unit`` (Flow-GRPO: 1): detailed, busy images score higher.

    Options: ``quality`` (JPEG quality, 95), ``kilobytes_per_unit``.
    """

    sign, default_kilobytes_per_unit = 1.0, 1.0

    def __init__(self, quality: int = 95, kilobytes_per_unit: float | None = None):
        super().__init__()
        self.quality = quality
        unit = self.default_kilobytes_per_unit if kilobytes_per_unit is None else kilobytes_per_unit
        self.kilobytes_per_unit = float(unit)
        if not 1 <= quality <= 100 or self.kilobytes_per_unit <= 0:
            raise RewardConfigError(
                f"{self.name}: quality must be in [1, 100] and kilobytes_per_unit > 0, got {quality} and {kilobytes_per_unit}"
            )

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        sizes = jpeg_kilobytes(images, self.quality) / self.kilobytes_per_unit
        return {self.name: (self.sign * sizes).to(images.device)}


@register_reward("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """Minus the JPEG size in kB divided by ``kilobytes_per_unit`` (Flow-GRPO: 500): flat, simple images score higher."""

    sign, default_kilobytes_per_unit = -1.0, 500.0
