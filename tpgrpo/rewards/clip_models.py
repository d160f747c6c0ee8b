"""Shared pieces of the CLIP-based rewards (PickScore, CLIP score, aesthetic).

- `load_pretrained`: a transformers ``from_pretrained`` from a local folder or a hub id, with a
  one-line `ModelLoadError` when it fails (nothing is downloaded when the hub is offline).
- `FrozenModelReward`: a reward whose models are frozen, stay in eval mode (even when a
  LightningModule calls ``train()``) and follow the images to their device on first use.
- `image_embeddings` / `text_embeddings`: unit-norm CLIP embeddings with Flow-GRPO's
  preprocessing: images rounded to uint8, then the model's own ``CLIPProcessor`` (resize, centre
  crop, normalise); prompts tokenized with padding and truncated at the text model's length (77).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from PIL import Image

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import Reward, RewardConfigError

T = TypeVar("T")


class ModelLoadError(RewardConfigError):
    """A reward's model or processor could not be loaded from the path or hub id given."""


def load_pretrained(loader: Callable[[str], T], path: str | os.PathLike, what: str) -> T:
    """``loader(path)`` (a ``from_pretrained``); a failure becomes a one-line `ModelLoadError`."""
    try:
        return loader(os.fspath(path))
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(
            f"could not load the {what} from {os.fspath(path)!r}; give a folder saved with save_pretrained "
            f"or a hub id that is already in the local cache ({reason})"
        ) from None


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` without gradients, in eval mode (returned for chaining)."""
    module.requires_grad_(False)
    return module.eval()


class FrozenModelReward(Reward):
    """A reward holding frozen models: always in eval mode, moved to the images' device on use."""

    def train(self, mode: bool = True) -> FrozenModelReward:
        """Stay in eval mode whatever ``mode`` is (no dropout in a reward model)."""
        return super().train(False)

    def follow(self, images: torch.Tensor) -> None:
        """Move the reward's models to ``images.device`` unless they are there already."""
        parameter = next(self.parameters(), None)
        if parameter is not None and parameter.device != images.device:
            self.to(images.device)


def _projected(output) -> torch.Tensor:
    """The projected features of ``get_image_features``/``get_text_features``: (B, D).

    transformers 4 returns the tensor; transformers 5 an output whose ``pooler_output`` holds it.
    """
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_embeddings(model, processor, images: torch.Tensor) -> torch.Tensor:
    """Unit-norm CLIP image embeddings: (B, 3, H, W) float in [0, 1] -> (B, D) on the model's device."""
    pictures = [Image.fromarray(array) for array in to_uint8(images)]
    pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    parameter = next(model.parameters())
    features = _projected(model.get_image_features(pixel_values=pixels.to(parameter.device, parameter.dtype)))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def text_embeddings(model, processor, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm CLIP text embeddings: B prompts -> (B, D) on the model's device.

    Prompts longer than the text model's positions (77 for CLIP) are truncated.
    """
    tokens = processor(
        text=list(prompts),
        padding=True,
        truncation=True,
        max_length=model.config.text_config.max_position_embeddings,
        return_tensors="pt",
    )
    device = next(model.parameters()).device
    features = _projected(model.get_text_features(**{key: value.to(device) for key, value in tokens.items()}))
    return torch.nn.functional.normalize(features.float(), dim=-1)


def image_text_cosine(model, processor, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """cos(image i, prompt i) for images (B, 3, H, W) in [0, 1] and B prompts -> (B,) in [-1, 1]."""
    return (image_embeddings(model, processor, images) * text_embeddings(model, processor, prompts)).sum(-1)
