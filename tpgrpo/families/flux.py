"""FLUX.1 (`FluxPipeline`)."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from tpgrpo.families.base import FlowModel, PromptEmbeds, linear_sigmas, pack_2x2, register_family, unpack_2x2
from tpgrpo.families.components import CLIP_L_TEXT, T5_XXL_ENCODER, VAE_16_CHANNELS, Checkpoint, Component


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


@register_family
class FluxModel(FlowModel):
    """FLUX.1 (`FluxPipeline`): CLIP-L pooled + T5 tokens, guidance-distilled transformer.

    ``guidance_scale`` goes to the transformer's guidance embedding (FLUX.1-dev); there is no
    unconditional branch, so ``uncond`` must be None. Latents are packed into 2x2 patches
    inside `velocity`.
    """

    checkpoints = (
        Checkpoint("flux", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev", {
            "transformer": Component(FluxTransformer2DModel, FLUX_DEV_TRANSFORMER),
            "text_encoder": Component(CLIPTextModel, CLIP_L_TEXT, CLIPTextConfig),
            "text_encoder_2": Component(T5EncoderModel, T5_XXL_ENCODER, T5Config),
            "vae": Component(AutoencoderKL, FLUX_DEV_VAE),
        }),
    )
    family = "flux"
    pipeline_class = FluxPipeline
    default_max_sequence_length = 512
    sequence_tokenizers = ("tokenizer_2",)  # T5
    _patch = 2

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def _encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(embeds, pooled)

    def _base_sigmas(self, num_steps: int) -> list[float]:
        return linear_sigmas(num_steps)

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h·w/4, 4C) tokens of 2x2 patches, as FLUX's transformer reads them."""
        return pack_2x2(latents)

    @staticmethod
    def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of `pack`: (N, h·w/4, 4C) -> (N, C, h, w)."""
        return unpack_2x2(tokens, h, w)

    def _velocity(self, transformer, latents, sigma, cond, guidance_scale, uncond):
        guidance = self._embedded_guidance(latents, guidance_scale, uncond)
        n, _, h, w = latents.shape
        device = latents.device
        cond = cond.to(self.dtype)
        out = transformer(
            hidden_states=self.pack(latents.to(self.dtype)),
            timestep=sigma,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=device, dtype=self.dtype),
            img_ids=FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, device, self.dtype),
            return_dict=False,
        )[0]
        return self.unpack(out.float(), h, w)
