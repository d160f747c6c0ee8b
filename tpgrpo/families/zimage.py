"""Z-Image (`ZImagePipeline`)."""
from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from tpgrpo.families.base import FlowModel, PromptEmbeds, guided_velocity, linear_sigmas, register_family
from tpgrpo.families.components import QWEN3_4B, Checkpoint, Component
from tpgrpo.families.flux import FLUX_DEV_VAE


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


@register_family
class ZImageModel(FlowModel):
    """Z-Image (`ZImagePipeline`): Qwen3 hidden states and a single-stream DiT.

    Prompts are padded to ``max_sequence_length`` tokens and masked; the transformer takes each
    image's real tokens. Its output is the negative of the flow velocity (`velocity` flips it) and
    its timestep is ``1 - sigma``. Classifier-free guidance with the empty prompt is
    ``v = v_u + g·(v_c - v_u)``: ``guidance_scale`` g here is the pipeline's ``guidance_scale + 1``
    (1 disables it; Z-Image-Turbo takes none).
    """

    checkpoints = (
        Checkpoint("zimage", "Z-Image-Turbo", "Tongyi-MAI/Z-Image-Turbo", {  # FLUX.1's 16-channel VAE
            "transformer": Component(ZImageTransformer2DModel, Z_IMAGE_TRANSFORMER),
            "text_encoder": Component(Qwen3Model, QWEN3_4B, Qwen3Config),
            "vae": Component(AutoencoderKL, FLUX_DEV_VAE),
        }),
    )
    family = "zimage"
    # single-stream: one attention per block (refiners included), text and image together
    lora_targets = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
    pipeline_class = ZImagePipeline
    default_max_sequence_length = 512
    _patch = 2

    @property
    def _latent_channels(self) -> int:
        return self.transformer.config.in_channels

    def _encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts),  # the pipeline rewrites the list in place
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        rows = [PromptEmbeds(e[None], mask=torch.ones(1, len(e), dtype=torch.bool, device=e.device)) for e in embeds]
        return PromptEmbeds.cat(rows).padded(self.max_sequence_length)

    def _base_sigmas(self, num_steps: int) -> list[float]:
        return linear_sigmas(num_steps)

    def _velocity(self, transformer, latents, sigma, cond, guidance_scale, uncond):
        guided = guidance_scale > 1.0
        if guided:
            latents, sigma, cond = self._guidance_batch(latents, sigma, cond, uncond)
        cond = cond.to(self.dtype)
        captions = [embeds[mask] for embeds, mask in zip(cond.prompt_embeds, cond.token_mask())]
        frames = list(latents.to(self.dtype).unsqueeze(2).unbind(0))
        out = transformer(frames, 1.0 - sigma, captions, return_dict=False)[0]
        velocity = -torch.stack([frame.float() for frame in out]).squeeze(2)
        if not guided:
            return velocity
        return guided_velocity(velocity, guidance_scale)
