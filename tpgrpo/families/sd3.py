"""SD3 and SD3.5 (`StableDiffusion3Pipeline`)."""
from __future__ import annotations

from diffusers import StableDiffusion3Pipeline

from tpgrpo.families.base import FlowModel, guided_velocity, PromptEmbeds, register_family


@register_family
class SD3Model(FlowModel):
    """Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): CLIP-L + CLIP-G (+ T5) and an MMDiT.

    Classifier-free guidance batches the unconditional (empty prompt unless ``uncond`` is
    given) and conditional rows into one transformer call: ``v = v_u + g·(v_c - v_u)``.
    """

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
