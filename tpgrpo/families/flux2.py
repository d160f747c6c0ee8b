"""FLUX.2 [klein] (`Flux2KleinPipeline`) and FLUX.2 [dev] (`Flux2Pipeline`)."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM

from tpgrpo.errors import UserInputError
from tpgrpo.families.base import (
    ATTENTION_PROJECTIONS,
    FlowModel,
    PromptEmbeds,
    Resolution,
    guided_velocity,
    linear_sigmas,
    register_family,
)
from tpgrpo.families.components import QWEN3_4B, Checkpoint, Component


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


@register_family
class Flux2Model(FlowModel):
    """FLUX.2 [klein] (`Flux2KleinPipeline`): Qwen3 hidden states of three layers and a FLUX-style
    transformer with 4-axis rotary position ids.

    Latents are the VAE's latents in 2x2 patches, normalised by the VAE's batch-norm statistics,
    (N, 4C, H/16, W/16), as the pipeline draws them; the transformer reads them as raster-order
    tokens. Prompts are padded to ``max_sequence_length`` tokens and not masked (as the pipeline
    does). Guidance: the base models use classifier-free guidance with the empty prompt; a
    step-distilled model (``is_distilled``) takes none, so ``guidance_scale`` must be 1. The
    sigma schedule's shift depends on the image size and the number of steps (FLUX.2's rule).
    """

    checkpoints = (
        Checkpoint("flux2-klein-4b", "FLUX.2 [klein] 4B", "black-forest-labs/FLUX.2-klein-base-4B", {
            "transformer": Component(Flux2Transformer2DModel, FLUX2_KLEIN_4B_TRANSFORMER),
            "text_encoder": Component(Qwen3ForCausalLM, QWEN3_4B, Qwen3Config),
            "vae": Component(AutoencoderKLFlux2, FLUX2_VAE),
        }),
    )
    family = "flux2"
    # the single blocks fuse q, k, v and the MLP input into one projection
    lora_targets = (*ATTENTION_PROJECTIONS, "attn.to_qkv_mlp_proj")
    pipeline_class = Flux2KleinPipeline
    default_max_sequence_length = 512
    _patch = 1

    @property
    def _latent_scale(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(embeds)

    def _base_sigmas(self, num_steps: int) -> list[float] | None:
        return None if self.pipe.scheduler.config.get("use_flow_sigmas") else linear_sigmas(num_steps)

    def _mu(self, resolution: Resolution, num_steps: int) -> float:
        return compute_empirical_mu(self._image_tokens(resolution), num_steps)

    def _velocity(self, transformer, latents, sigma, cond, guidance_scale, uncond):
        guided = guidance_scale > 1.0
        if guided and self.pipe.config.get("is_distilled", False):
            raise UserInputError(
                f"guidance_scale {guidance_scale}: this FLUX.2 model is step-distilled and takes no guidance; use 1"
            )
        if not guided:
            return self._forward(transformer, latents, sigma, cond)
        return guided_velocity(self._forward(transformer, *self._guidance_batch(latents, sigma, cond, uncond)),
                               guidance_scale)

    def _forward(self, transformer, latents, sigma, cond, guidance=None):
        """One transformer call on the latents as raster-order tokens, with FLUX.2's position ids."""
        _, c, h, w = latents.shape
        cond = cond.to(self.dtype)
        tokens = latents.to(self.dtype).flatten(2).transpose(1, 2)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.prompt_embeds,
            timestep=sigma,
            img_ids=self.pipe._prepare_latent_ids(latents).to(latents.device),
            txt_ids=self.pipe._prepare_text_ids(cond.prompt_embeds).to(latents.device),
            guidance=guidance,
            return_dict=False,
        )[0]
        return out[:, : h * w].float().transpose(1, 2).reshape(len(cond), c, h, w)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        norm = self.vae.bn
        mean = norm.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(norm.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents)
        return self.vae.decode(self.pipe._unpatchify_latents(latents * std + mean), return_dict=False)[0]


@register_family
class Flux2DevModel(Flux2Model):
    """FLUX.2 [dev] (`Flux2Pipeline`): Mistral Small 3 hidden states of three layers (the pipeline's
    system message before each prompt) and the FLUX.2 transformer; latents, position ids and the
    sigma schedule are FLUX.2 [klein]'s. The model is guidance-distilled: ``guidance_scale`` goes
    to the transformer's guidance embedding and there is no unconditional branch, so ``uncond``
    must be None.
    """

    checkpoints = (
        Checkpoint("flux2-dev", "FLUX.2 [dev]", "black-forest-labs/FLUX.2-dev", {
            "transformer": Component(Flux2Transformer2DModel, FLUX2_DEV_TRANSFORMER),
            "text_encoder": Component(Mistral3ForConditionalGeneration, MISTRAL_SMALL_3_24B, Mistral3Config),
            "vae": Component(AutoencoderKLFlux2, FLUX2_VAE),
        }),
    )
    family = "flux2-dev"
    pipeline_class = Flux2Pipeline

    def _velocity(self, transformer, latents, sigma, cond, guidance_scale, uncond):
        return self._forward(transformer, latents, sigma, cond, self._embedded_guidance(latents, guidance_scale, uncond))
