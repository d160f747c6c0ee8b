"""Parameter memory per rank of the real pipelines, computed from their architecture configs.

``python -m tpgrpo.memory [--model NAME] [--world-size N] [--lora-rank R]`` prints a
markdown table of GiB per rank for each weights precision (float32, bfloat16) and scale-out
strategy (ddp, fsdp2). Every model is built on the meta device from the config below, so
nothing is downloaded and no memory is allocated; the counts are the real modules' counts.

The figures are parameter (and buffer) bytes only: activations, the transient all-gathered
blocks of FSDP2, DDP's gradient buckets, the CUDA context and allocator slack are not included.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    ZImageTransformer2DModel,
)
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
)

from tpgrpo.errors import UserInputError
from tpgrpo.lora import DEFAULT_TARGET_MODULES
from tpgrpo.settings import parse_dtype

# ------------------------------------------------------------------ architecture configs
# Only the fields that shape the modules are kept; a value left out is the class default,
# which equals the hub file's value.

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (SD3Transformer2DModel).
# benchmarks/ builds its SD3.5-M-shaped transformers from this config.
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),
    "qk_norm": "rms_norm",
}

# stabilityai/stable-diffusion-3.5-large, transformer/config.json (SD3Transformer2DModel): the
# Medium's block design, wider and deeper, without the dual-attention layers.
SD35_LARGE_TRANSFORMER: dict[str, Any] = {
    **SD35_MEDIUM_TRANSFORMER,
    "num_layers": 38,
    "num_attention_heads": 38,
    "caption_projection_dim": 2432,
    "pos_embed_max_size": 192,
    "dual_attention_layers": (),
}

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

# stabilityai/stable-diffusion-3.5-medium, text_encoder_2/config.json (CLIPTextModelWithProjection,
# OpenCLIP ViT-bigG/14's text tower).
CLIP_G_TEXT: dict[str, Any] = {
    "hidden_size": 1280,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "intermediate_size": 5120,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
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
# stabilityai/stable-diffusion-3.5-medium, vae/config.json (AutoencoderKL).
SD35_MEDIUM_VAE: dict[str, Any] = {**VAE_16_CHANNELS, "scaling_factor": 1.5305, "shift_factor": 0.0609}
# black-forest-labs/FLUX.1-dev, vae/config.json (AutoencoderKL).
FLUX_DEV_VAE: dict[str, Any] = {**VAE_16_CHANNELS, "scaling_factor": 0.3611, "shift_factor": 0.1159}

# black-forest-labs/FLUX.1-dev, transformer/config.json (FluxTransformer2DModel).
FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}

# Qwen/Qwen-Image, transformer/config.json (QwenImageTransformer2DModel).
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
# Qwen/Qwen-Image, text_encoder/config.json (Qwen2_5_VLForConditionalGeneration: Qwen2.5-VL-7B-Instruct).
QWEN25_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
# Qwen/Qwen-Image, vae/config.json (AutoencoderKLQwenImage): the class defaults.
QWEN_IMAGE_VAE: dict[str, Any] = {}

# black-forest-labs/FLUX.2-klein-base-4B (and FLUX.2-klein-4B), transformer/config.json (Flux2Transformer2DModel).
FLUX2_KLEIN_4B_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "guidance_embeds": False,
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
# black-forest-labs/FLUX.2-klein-base-4B, vae/config.json (AutoencoderKLFlux2): the class defaults.
FLUX2_VAE: dict[str, Any] = {}

# black-forest-labs/FLUX.2-dev, transformer/config.json (Flux2Transformer2DModel): the class defaults.
FLUX2_DEV_TRANSFORMER: dict[str, Any] = {
    **FLUX2_KLEIN_4B_TRANSFORMER,
    "num_layers": 8,
    "num_single_layers": 48,
    "num_attention_heads": 48,
    "joint_attention_dim": 15360,
    "guidance_embeds": True,
}
# black-forest-labs/FLUX.2-dev, text_encoder/config.json (Mistral3ForConditionalGeneration: Mistral Small 3.x 24B
# with its Pixtral vision tower).
MISTRAL_SMALL_3_24B: dict[str, Any] = {
    "text_config": {
        "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "model_type": "pixtral", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
        "num_attention_heads": 16, "head_dim": 64, "patch_size": 14, "image_size": 1540,
    },
    "spatial_merge_size": 2,
    "multimodal_projector_bias": False,
    "tie_word_embeddings": False,
}

# Tongyi-MAI/Z-Image-Turbo (and Z-Image), transformer/config.json (ZImageTransformer2DModel).
Z_IMAGE_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "axes_dims": (32, 48, 48),
    "axes_lens": (1536, 512, 512),
}


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


TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")

# Components by the pipeline's attribute names.
SD3_TEXT_ENCODERS: dict[str, Component] = {
    "text_encoder": Component(CLIPTextModelWithProjection, CLIP_L_TEXT, CLIPTextConfig),
    "text_encoder_2": Component(CLIPTextModelWithProjection, CLIP_G_TEXT, CLIPTextConfig),
    "text_encoder_3": Component(T5EncoderModel, T5_XXL_ENCODER, T5Config),
}
PIPELINES: dict[str, dict[str, Component]] = {
    "sd3": {
        "transformer": Component(SD3Transformer2DModel, SD35_MEDIUM_TRANSFORMER),
        **SD3_TEXT_ENCODERS,
        "vae": Component(AutoencoderKL, SD35_MEDIUM_VAE),
    },
    "sd35-large": {  # the same text encoders and VAE as the Medium
        "transformer": Component(SD3Transformer2DModel, SD35_LARGE_TRANSFORMER),
        **SD3_TEXT_ENCODERS,
        "vae": Component(AutoencoderKL, SD35_MEDIUM_VAE),
    },
    "flux": {
        "transformer": Component(FluxTransformer2DModel, FLUX_DEV_TRANSFORMER),
        "text_encoder": Component(CLIPTextModel, CLIP_L_TEXT, CLIPTextConfig),
        "text_encoder_2": Component(T5EncoderModel, T5_XXL_ENCODER, T5Config),
        "vae": Component(AutoencoderKL, FLUX_DEV_VAE),
    },
    "qwenimage": {
        "transformer": Component(QwenImageTransformer2DModel, QWEN_IMAGE_TRANSFORMER),
        "text_encoder": Component(Qwen2_5_VLForConditionalGeneration, QWEN25_VL_7B, Qwen2_5_VLConfig),
        "vae": Component(AutoencoderKLQwenImage, QWEN_IMAGE_VAE),
    },
    "flux2-klein-4b": {
        "transformer": Component(Flux2Transformer2DModel, FLUX2_KLEIN_4B_TRANSFORMER),
        "text_encoder": Component(Qwen3ForCausalLM, QWEN3_4B, Qwen3Config),
        "vae": Component(AutoencoderKLFlux2, FLUX2_VAE),
    },
    "flux2-dev": {
        "transformer": Component(Flux2Transformer2DModel, FLUX2_DEV_TRANSFORMER),
        "text_encoder": Component(Mistral3ForConditionalGeneration, MISTRAL_SMALL_3_24B, Mistral3Config),
        "vae": Component(AutoencoderKLFlux2, FLUX2_VAE),
    },
    "zimage": {  # FLUX.1's 16-channel VAE
        "transformer": Component(ZImageTransformer2DModel, Z_IMAGE_TRANSFORMER),
        "text_encoder": Component(Qwen3Model, QWEN3_4B, Qwen3Config),
        "vae": Component(AutoencoderKL, FLUX_DEV_VAE),
    },
}
HUB_REPOS: dict[str, str] = {
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "sd35-large": "stabilityai/stable-diffusion-3.5-large",
    "flux": "black-forest-labs/FLUX.1-dev",
    "qwenimage": "Qwen/Qwen-Image",
    "flux2-klein-4b": "black-forest-labs/FLUX.2-klein-base-4B",
    "flux2-dev": "black-forest-labs/FLUX.2-dev",
    "zimage": "Tongyi-MAI/Z-Image-Turbo",
}
MODEL_FAMILIES: dict[str, str] = {  # for the LoRA targets
    "sd3": "sd3", "sd35-large": "sd3", "flux": "flux", "qwenimage": "qwenimage", "flux2-klein-4b": "flux2",
    "flux2-dev": "flux2-dev", "zimage": "zimage",
}
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2")
LORA_BYTES_PER_VALUE = 4  # LoRA weights, their gradients and AdamW's moments are float32
ADAM_STATES_PER_WEIGHT = 2  # exp_avg and exp_avg_sq
GIB = 1024**3


def _components(family: str) -> dict[str, Component]:
    if family not in PIPELINES:
        raise UserInputError(f"unknown model {family!r}; use one of {sorted(PIPELINES)}")
    return PIPELINES[family]


@dataclass(frozen=True)
class Size:
    """Element counts of one module: parameters and floating-point buffers.

    Floating buffers (SD3's sin-cos position table) are cast with the weights and stay
    replicated under FSDP2, which shards parameters only. Integer buffers (CLIP's position
    ids, well under a KiB) are left out.
    """

    parameters: int
    floating_buffers: int


def module_size(module: nn.Module) -> Size:
    """The `Size` of ``module`` (works on the meta device: counts come from shapes)."""
    return Size(
        parameters=sum(param.numel() for param in module.parameters()),
        floating_buffers=sum(buf.numel() for buf in module.buffers() if buf.is_floating_point()),
    )


@lru_cache(maxsize=None)
def _sizes(family: str) -> tuple[tuple[str, Size], ...]:
    return tuple((name, module_size(component.build_on_meta())) for name, component in _components(family).items())


def component_sizes(family: str) -> dict[str, Size]:
    """``component name -> Size`` of the real pipeline of ``family`` (a key of `PIPELINES`)."""
    return dict(_sizes(family))


def parameter_counts(family: str) -> dict[str, int]:
    """``component name -> parameter count`` of the real pipeline of ``family`` ("sd3": SD3.5
    Medium, "flux": FLUX.1-dev), each component built on the meta device from its config."""
    return {name: size.parameters for name, size in component_sizes(family).items()}


def is_lora_target(module_name: str, targets: Sequence[str]) -> bool:
    """Whether peft adapts the module called ``module_name`` for a list of ``targets``: the
    name equals a target or ends with ``"." + target``."""
    return any(module_name == target or module_name.endswith("." + target) for target in targets)


def lora_parameter_count_of(module: nn.Module, rank: int, targets: Sequence[str]) -> int:
    """LoRA parameters a rank-``rank`` adapter on ``targets`` adds to ``module``.

    Each adapted ``nn.Linear(in, out)`` gets ``A: rank x in`` and ``B: out x rank`` (no
    biases), so ``(in + out) * rank``. Only linear layers are counted: the project's targets
    are attention projections.
    """
    return sum(
        (layer.in_features + layer.out_features) * rank
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and is_lora_target(name, targets)
    )


@lru_cache(maxsize=None)
def _lora_parameter_count(family: str, rank: int, targets: tuple[str, ...]) -> int:
    transformer = _components(family)["transformer"].build_on_meta()
    return lora_parameter_count_of(transformer, rank, targets)


def lora_parameter_count(family: str, rank: int, targets: Sequence[str] | None = None) -> int:
    """LoRA parameters of the real transformer of ``family`` at ``rank``; ``targets`` default
    to `tpgrpo.lora.DEFAULT_TARGET_MODULES` (what `tpgrpo.lora.add_lora` adapts)."""
    if rank < 1:
        raise UserInputError(f"LoRA rank must be >= 1, got {rank}")
    _components(family)
    targets = DEFAULT_TARGET_MODULES[MODEL_FAMILIES[family]] if targets is None else targets
    return _lora_parameter_count(family, rank, tuple(targets))


def _per_rank(total_bytes: int, shards: int) -> int:
    """Bytes one rank holds of ``total_bytes`` split evenly over ``shards`` (rounded up)."""
    return math.ceil(total_bytes / shards)


def memory_table(
    family: str,
    weights_dtype: str | torch.dtype = "bfloat16",
    strategy: str = "ddp",
    world_size: int = 1,
    lora_rank: int = 32,
    text_encoders_on_device: bool = True,
) -> dict[str, int]:
    """Bytes per rank of the model state of a TP-GRPO run, by part.

    Parts: the frozen transformer, the text encoders (0 with ``text_encoders_on_device=False``:
    released or offloaded to the CPU; ``offload_text_encoders`` brings them back for each
    ``encode``, so that moment's peak still holds them), the VAE — all three in
    ``weights_dtype`` — and the float32 LoRA weights, their AdamW state (two float32 values per
    weight) and gradients.

    ``strategy``: "ddp" replicates everything; "fsdp2" (``fully_shard`` per transformer block,
    as `tpgrpo.distributed` does) splits the transformer's parameters (frozen and LoRA), the LoRA
    gradients and the optimizer state evenly over ``world_size`` ranks and replicates the text
    encoders, the VAE and the transformer's floating buffers. Uneven-split padding is left out.

    Not included: activations (they depend on batch, resolution and checkpointing), FSDP2's
    transient all-gathered blocks, DDP's gradient buckets, the CUDA context and allocator slack.
    """
    if strategy not in STRATEGIES:
        raise UserInputError(f"unknown strategy {strategy!r}; use one of {list(STRATEGIES)}")
    if world_size < 1:
        raise UserInputError(f"world_size must be >= 1, got {world_size}")
    width = parse_dtype(weights_dtype).itemsize
    sizes = component_sizes(family)
    shards = world_size if strategy == "fsdp2" else 1
    transformer = sizes["transformer"]
    text_encoders = sum(
        size.parameters + size.floating_buffers for name, size in sizes.items() if name in TEXT_ENCODERS
    )
    vae = sizes["vae"]
    lora_bytes = lora_parameter_count(family, lora_rank) * LORA_BYTES_PER_VALUE
    return {
        "transformer (frozen)": (
            _per_rank(transformer.parameters * width, shards) + transformer.floating_buffers * width
        ),
        "text encoders": text_encoders * width if text_encoders_on_device else 0,
        "VAE": (vae.parameters + vae.floating_buffers) * width,
        "LoRA weights": _per_rank(lora_bytes, shards),
        "AdamW state": _per_rank(ADAM_STATES_PER_WEIGHT * lora_bytes, shards),
        "gradients": _per_rank(lora_bytes, shards),
    }


WEIGHTS_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
FAMILY_TITLES: dict[str, str] = {
    "sd3": "Stable Diffusion 3.5 Medium", "sd35-large": "Stable Diffusion 3.5 Large", "flux": "FLUX.1-dev",
    "qwenimage": "Qwen-Image", "flux2-klein-4b": "FLUX.2 [klein] 4B",
    "flux2-dev": "FLUX.2 [dev]", "zimage": "Z-Image-Turbo",
}


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown_table(family: str, world_size: int, lora_rank: int) -> str:
    """The GiB-per-rank table `main` prints: one column per weights dtype and strategy, one row
    per part, and the totals with the text encoders on the accelerator and released."""
    columns = [(dtype, strategy) for dtype in WEIGHTS_DTYPES for strategy in STRATEGIES]
    tables = [memory_table(family, dtype, strategy, world_size, lora_rank) for dtype, strategy in columns]
    counts = parameter_counts(family)
    sizes = component_sizes(family)
    text_parameters = sum(count for name, count in counts.items() if name in TEXT_ENCODERS)
    parameters = {
        "transformer (frozen)": counts["transformer"],
        "text encoders": text_parameters,
        "VAE": counts["vae"],
        "LoRA weights": lora_parameter_count(family, lora_rank),
    }
    lines = [
        f"{FAMILY_TITLES[family]} (`{HUB_REPOS[family]}`): GiB per rank, world size {world_size}, "
        f"LoRA rank {lora_rank}.",
        "",
        "| part | parameters | " + " | ".join(f"{dtype} {strategy}" for dtype, strategy in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for part in tables[0]:
        count = f"{parameters[part] / 1e6:,.1f} M" if part in parameters else ""
        lines.append(f"| {part} | {count} | " + " | ".join(_gib(table[part]) for table in tables) + " |")
    totals = [sum(table.values()) for table in tables]
    released = [total - table["text encoders"] for total, table in zip(totals, tables)]
    lines.append("| **total, text encoders on device** | | " + " | ".join(f"**{_gib(v)}**" for v in totals) + " |")
    lines.append("| **total, text encoders released** | | " + " | ".join(f"**{_gib(v)}**" for v in released) + " |")
    lines.append("")
    lines.append(
        "Text encoders: "
        + ", ".join(f"{name} {counts[name] / 1e6:,.1f} M" for name in counts if name in TEXT_ENCODERS)
        + " parameters."
    )
    if sizes["transformer"].floating_buffers:
        lines.append(
            f"The transformer row includes a {sizes['transformer'].floating_buffers / 1e6:,.1f} M-value buffer "
            "(the sin-cos position table): cast with the weights, replicated under fsdp2."
        )
    lines.append("Parameter bytes only, computed from the configs on the meta device: no activations.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print `markdown_table` for the family, world size and LoRA rank given on the command line."""
    parser = argparse.ArgumentParser(prog="python -m tpgrpo.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--family", dest="family", choices=sorted(PIPELINES), default="sd3")
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs) the run is spread over")
    parser.add_argument("--lora-rank", type=int, default=32)
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.lora_rank < 1:
        parser.error("--world-size and --lora-rank must be >= 1")
    print(markdown_table(args.family, args.world_size, args.lora_rank))


if __name__ == "__main__":
    main()
