"""Qwen-Image (`QwenImagePipeline`)."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tpgrpo.families.base import FlowModel, PromptEmbeds, linear_sigmas, pack_2x2, register_family, unpack_2x2
from tpgrpo.families.components import Checkpoint, Component


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


@register_family
class QwenImageModel(FlowModel):
    """Qwen-Image (`QwenImagePipeline`): Qwen2.5-VL hidden states and an MMDiT on 2x2 patches.

    Prompts are padded to ``max_sequence_length`` tokens and masked. Classifier-free guidance
    (the pipeline's "true CFG") batches the negative prompt " " (Qwen-Image's examples) with the
    prompts, ``v = v_u + g·(v_c - v_u)``, then rescales each image token to the norm of ``v_c``
    as the pipeline does. Sigmas shift with the image size.
    """

    checkpoints = (
        Checkpoint("qwenimage", "Qwen-Image", "Qwen/Qwen-Image", {
            "transformer": Component(QwenImageTransformer2DModel, QWEN_IMAGE_TRANSFORMER),
            "text_encoder": Component(Qwen2_5_VLForConditionalGeneration, QWEN25_VL_7B, Qwen2_5_VLConfig),
            "vae": Component(AutoencoderKLQwenImage, QWEN_IMAGE_VAE),
        }),
    )
    family = "qwenimage"
    pipeline_class = QwenImagePipeline
    default_max_sequence_length = 512
    negative_prompt = " "
    _patch = 2

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def _encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds(embeds, mask=None if mask is None else mask.bool()).padded(self.max_sequence_length)

    def _base_sigmas(self, num_steps: int) -> list[float]:
        return linear_sigmas(num_steps)

    def _velocity(self, transformer, latents, sigma, cond, guidance_scale, uncond):
        _, _, h, w = latents.shape
        guided = guidance_scale > 1.0
        if guided:
            latents, sigma, cond = self._guidance_batch(latents, sigma, cond, uncond)
        cond = cond.to(self.dtype)
        rows = len(cond)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((rows,), float(guidance_scale), device=latents.device, dtype=torch.float32)
        out = transformer(
            hidden_states=pack_2x2(latents.to(self.dtype)),
            timestep=sigma,
            guidance=guidance,
            encoder_hidden_states=cond.prompt_embeds,
            encoder_hidden_states_mask=None if cond.mask is None or cond.mask.all() else cond.mask,
            img_shapes=[[(1, h // 2, w // 2)]] * rows,
            return_dict=False,
        )[0].float()
        if guided:
            v_uncond, v_cond = out.chunk(2)
            combined = v_uncond + guidance_scale * (v_cond - v_uncond)
            out = combined * (v_cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        return unpack_2x2(out, h, w)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        frames = latents.unsqueeze(2) / inverse_std + mean  # the VAE is a video VAE: one frame
        return self.vae.decode(frames, return_dict=False)[0][:, :, 0]
