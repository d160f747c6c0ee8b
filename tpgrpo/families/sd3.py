"""SD3 and SD3.5 (`StableDiffusion3Pipeline`)."""
from __future__ import annotations

from typing import Any

from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from tpgrpo.families.base import FlowModel, PromptEmbeds, guided_velocity, register_family
from tpgrpo.families.components import CLIP_L_TEXT, T5_XXL_ENCODER, VAE_16_CHANNELS, Checkpoint, Component


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
# stabilityai/stable-diffusion-3.5-medium, vae/config.json (AutoencoderKL).
SD35_MEDIUM_VAE: dict[str, Any] = {**VAE_16_CHANNELS, "scaling_factor": 1.5305, "shift_factor": 0.0609}


@register_family
class SD3Model(FlowModel):
    """Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): CLIP-L + CLIP-G (+ T5) and an MMDiT.

    Classifier-free guidance batches the unconditional (empty prompt unless ``uncond`` is
    given) and conditional rows into one transformer call: ``v = v_u + g·(v_c - v_u)``.
    """

    checkpoints = tuple(
        Checkpoint(name, title, hub_id, {
            "transformer": Component(SD3Transformer2DModel, transformer),
            "text_encoder": Component(CLIPTextModelWithProjection, CLIP_L_TEXT, CLIPTextConfig),
            "text_encoder_2": Component(CLIPTextModelWithProjection, CLIP_G_TEXT, CLIPTextConfig),
            "text_encoder_3": Component(T5EncoderModel, T5_XXL_ENCODER, T5Config),
            "vae": Component(AutoencoderKL, SD35_MEDIUM_VAE),  # the Large has the Medium's VAE
        })
        for name, title, hub_id, transformer in (
            ("sd3", "Stable Diffusion 3.5 Medium", "stabilityai/stable-diffusion-3.5-medium", SD35_MEDIUM_TRANSFORMER),
            ("sd35-large", "Stable Diffusion 3.5 Large", "stabilityai/stable-diffusion-3.5-large", SD35_LARGE_TRANSFORMER),
        )
    )
    family = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    default_max_sequence_length = 256
    sequence_tokenizers = ("tokenizer_3",)  # T5; the CLIP tokenizers read 77 tokens

    @property
    def _patch(self) -> int:
        return self.transformer.config.patch_size

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds(embeds, pooled)

    def _velocity(self, transformer, latents, sigma, cond, guidance_scale, uncond):
        guided = guidance_scale > 1.0
        if guided:
            latents, sigma, cond = self._guidance_batch(latents, sigma, cond, uncond)
        cond = cond.to(self.dtype)
        out = transformer(
            hidden_states=latents.to(self.dtype),
            timestep=sigma * self.pipe.scheduler.config.num_train_timesteps,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0].float()
        if not guided:
            return out
        return guided_velocity(out, guidance_scale)
