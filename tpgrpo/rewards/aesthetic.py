"""The LAION aesthetic predictor (improved-aesthetic-predictor) as Flow-GRPO's ``aesthetic_scorer``.

An MLP head (768 -> 1024 -> 128 -> 64 -> 16 -> 1) over the unit-norm CLIP ViT-L/14 image
embedding (``openai/clip-vit-large-patch14``). The score is the head's raw output, roughly on the
1-10 scale of the AVA ratings the head was trained on.

The head's weights are read from a safetensors file only (never unpickled). The released
``sac+logos+ava1-l14-linearMSE.pth`` is a plain state dict; convert it once with

    python -m tpgrpo.rewards.aesthetic sac+logos+ava1-l14-linearMSE.pth aesthetic_head.safetensors

which loads it with ``torch.load(..., weights_only=True)`` (tensors only, no code) and writes
``aesthetic_head.safetensors``; then set ``rewards: {aesthetic: {weight: 1.0, head: aesthetic_head.safetensors}}``.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from tpgrpo.rewards.base import RewardConfigError, register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, freeze, image_embeddings, load_pretrained

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
EMBEDDING_DIM = 768


def aesthetic_head() -> nn.Sequential:
    """The predictor's MLP: (N, 768) -> (N, 1).

    The dropout layers (inactive in eval mode) keep the released state dict's layer indices
    (0, 2, 4, 6, 7) so its weights load unchanged.
    """
    return nn.Sequential(
        nn.Linear(EMBEDDING_DIM, 1024), nn.Dropout(0.2),
        nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def load_head(path: str | os.PathLike) -> nn.Sequential:
    """The head with the weights of a safetensors file (keys ``layers.<i>.weight``/``bias``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise RewardConfigError(
            f"aesthetic: head must be a .safetensors file, got {str(path)!r}; convert the released .pth with "
            "`python -m tpgrpo.rewards.aesthetic IN.pth OUT.safetensors`"
        )
    if not path.is_file():
        raise RewardConfigError(f"aesthetic: head file {str(path)!r} does not exist")
    state = {key.removeprefix("layers."): value for key, value in load_file(os.fspath(path)).items()}
    head = aesthetic_head()
    try:
        head.load_state_dict(state)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise RewardConfigError(
            f"aesthetic: {str(path)!r} does not hold the aesthetic head's weights ({reason})"
        ) from None
    return head


def convert_head(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Write the released ``.pth`` head (a state dict) as safetensors, loading tensors only."""
    state = torch.load(source, map_location="cpu", weights_only=True)
    save_file({key: value.contiguous() for key, value in state.items()}, os.fspath(target))


@register_reward("aesthetic")
class AestheticScore(FrozenModelReward):
    """The LAION aesthetic predictor's score per image (see the module docstring).

    Options: ``head`` (path of the head's .safetensors file, required) and ``clip_model`` (folder
    or hub id holding the CLIP ViT-L/14 model and its ``CLIPProcessor``).
    """

    def __init__(self, head: str | os.PathLike | None = None, clip_model: str | os.PathLike = DEFAULT_CLIP):
        super().__init__()
        if head is None:
            raise RewardConfigError(
                "aesthetic: set rewards.aesthetic.head to the head's .safetensors file "
                "(see `python -m tpgrpo.rewards.aesthetic --help` to convert the released .pth)"
            )
        self.head = freeze(load_head(head))
        self.processor = load_pretrained(CLIPProcessor.from_pretrained, clip_model, "aesthetic CLIP processor")
        self.clip = freeze(load_pretrained(CLIPModel.from_pretrained, clip_model, "aesthetic CLIP model"))
        if self.clip.config.projection_dim != EMBEDDING_DIM:
            raise RewardConfigError(
                f"aesthetic: clip_model embeds images in {self.clip.config.projection_dim} dimensions, "
                f"the head needs {EMBEDDING_DIM} (CLIP ViT-L/14)"
            )

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"aesthetic": (B,)} for images (B, 3, H, W) in [0, 1]; prompts are not used."""
        self.follow(images)
        embeddings = image_embeddings(self.clip, self.processor, images)
        return {self.name: self.head(embeddings.to(self.head[0].weight.dtype)).squeeze(1).float().to(images.device)}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: convert the released ``.pth`` head to safetensors."""
    parser = argparse.ArgumentParser(description="Convert the LAION aesthetic head (.pth state dict) to safetensors.")
    parser.add_argument("source", help="the released .pth, e.g. sac+logos+ava1-l14-linearMSE.pth")
    parser.add_argument("target", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    convert_head(args.source, args.target)
    load_head(args.target)  # check that it holds the head
    print(f"wrote {args.target}")


if __name__ == "__main__":
    main()
