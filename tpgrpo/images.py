"""Image grids and PNG files from (N, 3, H, W) float tensors in [0, 1] (no torchvision needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


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


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide (a long word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def captioned_grid(
    images: torch.Tensor, columns: int, captions: list[str], scale: int = 1, row_labels: list[str] | None = None
) -> Image.Image:
    """A grid of (N, 3, H, W) images in [0, 1] with ``captions[c]`` written above column ``c``
    (wrapped to the column's width) and optional ``row_labels`` at the left of each row."""
    if len(captions) != columns:
        raise ValueError(f"need one caption per column: {columns} columns, {len(captions)} captions")
    grid = to_pil(image_grid(images, columns=columns), scale)
    rows = math.ceil(images.shape[0] / columns)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"need one label per row: {rows} rows, {len(row_labels)} labels")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(grid)
    cell = (images.shape[-1] + 2) * scale
    wrapped = [_wrap(caption, measure, font, cell - 4) for caption in captions]
    line_height = int(font.getbbox("Ag")[3]) + 2
    top = max(len(lines) for lines in wrapped) * line_height + 4
    left = int(max((measure.textlength(label, font=font) for label in row_labels or []), default=0)) + (6 if row_labels else 0)
    canvas = Image.new("RGB", (grid.width + left, grid.height + top), "white")
    canvas.paste(grid, (left, top))
    draw = ImageDraw.Draw(canvas)
    for column, lines in enumerate(wrapped):
        for number, line in enumerate(lines):
            draw.text((left + column * cell + 2 * scale, 2 + number * line_height), line, fill="black", font=font)
    cell_height = (images.shape[-2] + 2) * scale
    for row, label in enumerate(row_labels or []):
        draw.text((2, top + row * cell_height + cell_height // 2 - line_height // 2), label, fill="black", font=font)
    return canvas
