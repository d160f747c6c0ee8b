"""Image grids and PNG files from (N, 3, H, W) float tensors in [0, 1] (no torchvision needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> torch.Tensor:
    """Tile (N, 3, H, W) images into one (3, rows·(H+p)+p, columns·(W+p)+p) image on white."""
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = torch.ones(channels, rows * (height + padding) + padding, columns * (width + padding) + padding)
    for i, image in enumerate(images.clamp(0, 1)):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = image
    return grid


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8 array on the CPU (rounded, as Flow-GRPO)."""
    return (images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def to_pil(image: torch.Tensor, scale: int = 1) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL image, optionally enlarged ``scale`` times (nearest neighbour)."""
    picture = Image.fromarray(to_uint8(image[None])[0])
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return picture


def save_image(image: torch.Tensor, path: str | Path, scale: int = 1) -> None:
    """Write a (3, H, W) image in [0, 1] as PNG."""
    to_pil(image, scale).save(path)
