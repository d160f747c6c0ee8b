"""Z-Image (`ZImagePipeline`)."""
from __future__ import annotations

import torch
from diffusers import ZImagePipeline

from tpgrpo.families.base import FlowModel, guided_velocity, linear_sigmas, PromptEmbeds, register_family


@register_family
class ZImageModel(FlowModel):
    """Z-Image (`ZImagePipeline`): Qwen3 hidden states and a single-stream DiT.

    Prompts are padded to ``max_sequence_length`` tokens and masked; the transformer takes each
    image's real tokens. Its output is the negative of the flow velocity (`velocity` flips it) and
    its timestep is ``1 - sigma``. Classifier-free guidance with the empty prompt is
    ``v = v_u + g·(v_c - v_u)``: ``guidance_scale`` g here is the pipeline's ``guidance_scale + 1``
    (1 disables it; Z-Image-Turbo takes none).
    """

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
