"""The architecture of published checkpoints, for building them on the meta device (`tpgrpo.memory`).

Each family lists its checkpoints (`Checkpoint`: hub id, title, components); the configs below are
the ones several families share. Only the fields that shape the modules are kept; a value left
out is the class default, which equals the hub file's value.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Component:
    """One pipeline component: its model class and config.

    ``config_class``: the transformers configuration class the config dict builds (the model
    is ``model_class(config_class(**config))``); None for a diffusers model
    (``model_class.from_config(config)``).
    """

    model_class: type[nn.Module]
    config: Mapping[str, Any]
    config_class: type | None = None

    def build_on_meta(self) -> nn.Module:
        """The component with every tensor on the meta device: shapes, no storage."""
        with torch.device("meta"):
            if self.config_class is None:
                return self.model_class.from_config(dict(self.config))
            return self.model_class(self.config_class(**self.config))


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint of a family: its name in `tpgrpo.memory` (``--model``), title, hub id and
    components by the pipeline's attribute names."""

    name: str
    title: str
    hub_id: str
    components: Mapping[str, Component]


# stabilityai/stable-diffusion-3.5-medium, text_encoder/config.json (CLIPTextModelWithProjection,
# OpenAI CLIP ViT-L/14's text tower). FLUX.1-dev's text_encoder/config.json is the same tower
# as a CLIPTextModel (its projection_dim is unused there).
CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# stabilityai/stable-diffusion-3.5-medium, text_encoder_3/config.json and black-forest-labs/FLUX.1-dev,
# text_encoder_2/config.json (T5EncoderModel, the encoder of google/t5-v1_1-xxl).
T5_XXL_ENCODER: dict[str, Any] = {
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
# The 16-channel AutoencoderKL of both pipelines; their vae/config.json files differ only in the
# latent scaling_factor / shift_factor, which shape no module.
VAE_16_CHANNELS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# The Qwen3-4B text encoder of FLUX.2 [klein] 4B (Qwen3ForCausalLM) and of Z-Image (Qwen3Model):
# text_encoder/config.json of both.
QWEN3_4B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}
