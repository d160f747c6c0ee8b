"""Qwen-Image (`QwenImagePipeline`)."""
from __future__ import annotations

import torch
from diffusers import QwenImagePipeline

from tpgrpo.families.base import FlowModel, linear_sigmas, pack_2x2, PromptEmbeds, register_family, unpack_2x2


@register_family
class QwenImageModel(FlowModel):
    """Qwen-Image (`QwenImagePipeline`): Qwen2.5-VL hidden states and an MMDiT on 2x2 patches.

    Prompts are padded to ``max_sequence_length`` tokens and masked. Classifier-free guidance
    (the pipeline's "true CFG") batches the negative prompt " " (Qwen-Image's examples) with the
    prompts, ``v = v_u + g·(v_c - v_u)``, then rescales each image token to the norm of ``v_c``
    as the pipeline does. Sigmas shift with the image size.
    """

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
