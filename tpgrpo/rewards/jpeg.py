"""JPEG (in)compressibility rewards of Flow-GRPO / DDPO: the file size of the JPEG-encoded image."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import torch
from PIL import Image

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import Reward, register_reward


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each (3, H, W) image in [0, 1] saved as JPEG: (B, 3, H, W) -> (B,)."""
    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    """Minus the JPEG size in kB: flat, simple images score higher."""

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = quality

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return {self.name: -jpeg_kilobytes(images, self.quality).to(images.device)}


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    """The JPEG size in kB: detailed, busy images score higher."""

    def score(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return {self.name: jpeg_kilobytes(images, self.quality).to(images.device)}
