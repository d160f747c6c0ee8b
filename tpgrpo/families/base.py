"""The model side of TP-GRPO: a flow-matching text-to-image model behind one small interface.

`FlowModel` wraps a diffusers pipeline and exposes what the rollout and the training step need:

    cond = model.encode(prompts)                          # PromptEmbeds of N images, no grad
    sigmas = model.sigmas(num_steps, resolution)          # (T+1,) float32, 1 -> 0
    x = model.initial_noise(n, resolution, generator)     # (N, C, h, w) float32
    v = model.velocity(x, sigma, cond, guidance_scale)    # (N, C, h, w) float32, one transformer call
    images = model.decode(x)                              # (N, 3, H, W) float32 in [0, 1], no grad

Latents are always (N, C, h, w) for callers; a family's packing into tokens, position ids,
timestep and velocity sign conventions happen inside `velocity`. All
weights are frozen on construction; the policy is a LoRA added to ``model.transformer``
(see `tpgrpo.lora`), and ``velocity(..., transformer=...)`` accepts a wrapped transformer.
`FlowModel` is an ``nn.Module`` so that Lightning moves it with the LightningModule; its
state dict therefore holds every frozen weight (save only the LoRA in checkpoints).

Each family is one file of this package with one `FlowModel` subclass, registered for its
diffusers pipeline class by `register_family`.
"""
from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from transformers import ProcessorMixin

from tpgrpo.errors import UserInputError

Resolution = int | tuple[int, int]
# The image and text attention projections of the joint blocks (Flow-GRPO's and TP-GRPO's
# recipe). FLUX.1 and Qwen-Image use the same names: FLUX.1's double blocks and Qwen-Image's
# blocks have all eight, FLUX.1's single blocks the image q/k/v. "attn." keeps SD3.5's extra
# image-only attention (attn2) out, as the recipe does.
ATTENTION_PROJECTIONS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)


class ModelLoadError(UserInputError):
    """A model path or hub id that cannot be loaded; the message says what to change."""


@dataclass
class PromptEmbeds:
    """Text conditioning of N images.

    ``prompt_embeds``: (N, L, D) token embeddings (SD3: CLIP and T5 tokens; FLUX.1: T5 tokens;
    Qwen-Image, FLUX.2 and Z-Image: the hidden states of their Qwen or Mistral text model).
    ``pooled``: (N, P) pooled embeddings, for the families that have them (SD3: both CLIP
    encoders; FLUX.1: CLIP); None otherwise.
    ``mask``: (N, L) bool, True for a real token, for the families whose prompts have different
    lengths (Qwen-Image, Z-Image): rows are padded with zeros to a common length. None: every
    token is real.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, length = self.prompt_embeds.shape[:2]
        if self.pooled is not None and self.pooled.shape[0] != n:
            raise ValueError(f"prompt_embeds has {n} rows but pooled has {self.pooled.shape[0]}")
        if self.mask is not None and (self.mask.shape != (n, length) or self.mask.dtype != torch.bool):
            raise ValueError(f"mask must be bool of shape ({n}, {length}), got {self.mask.dtype} {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that are set, by name (what the embedding cache stores)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(**{name: fn(name, value) for name, value in self.tensors().items()})

    def index(self, idx: torch.Tensor | Sequence[int]) -> PromptEmbeds:
        """Rows ``idx`` (LongTensor (M,), repeats allowed) as a new PromptEmbeds of M images."""
        idx = torch.as_tensor(idx, dtype=torch.long, device=self.prompt_embeds.device)
        return self._map(lambda name, value: value[idx])

    def to(self, target: torch.device | str | torch.dtype) -> PromptEmbeds:
        """On another device, or with the embeddings in another dtype (the mask stays bool)."""
        if isinstance(target, torch.dtype):
            return self._map(lambda name, value: value if name == "mask" else value.to(target))
        return self._map(lambda name, value: value.to(target))

    def token_mask(self) -> torch.Tensor:
        """(N, L) bool: ``mask``, or all True when it is None."""
        if self.mask is not None:
            return self.mask
        return torch.ones(self.prompt_embeds.shape[:2], dtype=torch.bool, device=self.prompt_embeds.device)

    def trimmed(self) -> PromptEmbeds:
        """Without the trailing token columns that are padding in every row (masked families only)."""
        if self.mask is None or len(self) == 0:
            return self
        real = self.mask.any(dim=0).nonzero()
        length = int(real[-1]) + 1 if len(real) else 1
        if length == self.mask.shape[1]:
            return self
        return PromptEmbeds(self.prompt_embeds[:, :length], self.pooled, self.mask[:, :length])

    def padded(self, length: int) -> PromptEmbeds:
        """Padded with masked zero tokens to ``length`` tokens (at least the current length)."""
        pad = length - self.prompt_embeds.shape[1]
        if pad < 0:
            raise ValueError(f"cannot pad {self.prompt_embeds.shape[1]} tokens to {length}")
        if pad == 0 and self.mask is None:
            return self
        embeds = torch.nn.functional.pad(self.prompt_embeds, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(self.token_mask(), (0, pad), value=False)
        return PromptEmbeds(embeds, self.pooled, mask)

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Rows of ``parts`` one after the other; parts of different lengths are padded (masked)."""
        if not parts:
            raise ValueError("PromptEmbeds.cat needs at least one part")
        if len({p.pooled is None for p in parts}) > 1:
            raise ValueError("PromptEmbeds.cat: some parts have pooled embeddings and some do not")
        length = max(p.prompt_embeds.shape[1] for p in parts)
        if any(p.mask is not None or p.prompt_embeds.shape[1] != length for p in parts):
            parts = [p.padded(length) for p in parts]
        return PromptEmbeds(**{name: torch.cat([p.tensors()[name] for p in parts]) for name in parts[0].tensors()})


class FlowModel(nn.Module):
    """A frozen flow-matching text-to-image pipeline; subclasses implement one model family.

    ``max_sequence_length``: text tokens per prompt (None: the family's default; SD3 and FLUX.1:
    T5 tokens). An SD3 pipeline without T5 (the tiny model) still appends that many zero tokens,
    so it must match the value the model was trained with. ``offload_text_encoders``: keep the text encoders on
    the CPU and move them to the model's device only while `encode` runs.
    ``decode_batch_size``: most images per VAE call in `decode`.
    """

    family: str = ""
    pipeline_class: type[DiffusionPipeline]
    lora_targets: tuple[str, ...] = ATTENTION_PROJECTIONS  # module name suffixes the LoRA adapts by default
    default_max_sequence_length: int = 256
    negative_prompt: str = ""  # the unconditional branch of classifier-free guidance
    sequence_tokenizers: tuple[str, ...] = ("tokenizer",)  # the pipeline's tokenizers cut at max_sequence_length
    _patch: int  # latent cells per transformer token along each side
    _latent_channels: int

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        max_sequence_length: int | None = None,
        offload_text_encoders: bool = False,
        decode_batch_size: int = 16,
    ):
        super().__init__()
        if decode_batch_size < 1:
            raise UserInputError(f"decode_batch_size must be >= 1, got {decode_batch_size}")
        if max_sequence_length is not None and max_sequence_length < 1:
            raise UserInputError(f"max_sequence_length must be >= 1 (None: the default), got {max_sequence_length}")
        self.pipe = pipe
        self.pipeline_class = type(pipe)  # what exported LoRAs are written for
        self.transformer = pipe.transformer
        self._dtype = pipe.transformer.dtype  # of the base weights (a LoRA added later is float32)
        self.vae = pipe.vae
        self.text_encoders = nn.ModuleList(
            [getattr(pipe, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")
             if getattr(pipe, name, None) is not None]
        )
        self.requires_grad_(False)
        self.eval()
        self.max_sequence_length = max_sequence_length or self.default_max_sequence_length
        self.offload_text_encoders = offload_text_encoders
        self.decode_batch_size = decode_batch_size
        self._negative: PromptEmbeds | None = None
        self.embedding_cache = None  # an EmbeddingCache once a run's prompts are encoded (model.prompt_cache)
        if offload_text_encoders:
            self.text_encoders.to("cpu")

    @staticmethod
    def from_pipeline(pipe: DiffusionPipeline, **kwargs) -> FlowModel:
        """The `FlowModel` subclass for ``pipe``'s class; ``kwargs`` go to its constructor."""
        for cls in FAMILIES.values():
            if isinstance(pipe, cls.pipeline_class):
                return cls(pipe, **kwargs)
        raise ModelLoadError(
            f"unsupported pipeline class {type(pipe).__name__}; supported: {', '.join(FAMILIES)}"
        )

    @property
    def device(self) -> torch.device:
        """Device of the transformer (where `velocity`, `encode` and `initial_noise` put tensors)."""
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the transformer's base weights (inputs are cast to it)."""
        return self._dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent cell along each side."""
        return self.pipe.vae_scale_factor

    @property
    def _latent_scale(self) -> int:
        """Pixels per cell of the latents callers see (FLUX.2's are 2x2-patchified VAE latents)."""
        return self.vae_scale_factor

    def train(self, mode: bool = True) -> FlowModel:
        """Train/eval mode of the transformer only; the VAE and text encoders stay in eval mode."""
        super().train(mode)
        if self.vae is not None:  # a velocity-only pipeline (the benchmarks' SD3.5-shaped transformer) has none
            self.vae.eval()
        self.text_encoders.eval()
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Text conditioning of ``prompts`` (N strings) on the model's device.

        Read from ``embedding_cache`` (`tpgrpo.training.embedding_cache.EmbeddingCache`) when it holds
        them all; otherwise each distinct prompt is encoded once, so a batch of groups costs one
        pass per prompt. Padding columns that no row needs are dropped (masked families), so
        the transformer sees as many text tokens as the longest of ``prompts`` has.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError("encode needs a non-empty list of prompts")
        unique = list(dict.fromkeys(prompts))
        position = {p: i for i, p in enumerate(unique)}
        cached = self.embedding_cache.lookup(unique) if self.embedding_cache is not None else None
        embeds = cached.to(self.device) if cached is not None else self.encode_uncached(unique)
        return embeds.index([position[p] for p in prompts]).trimmed()

    @torch.no_grad()
    def encode_uncached(self, prompts: Sequence[str]) -> PromptEmbeds:
        """``prompts`` (distinct) through the text encoders, on the model's device."""
        with self._text_encoders_on(self.device):
            return self._encode_unique(list(prompts))

    def release_text_encoders(self) -> None:
        """Move the text encoders to the CPU for good (`offload_text_encoders` from now on: an
        uncached prompt brings them back for its encode)."""
        self.text_encoders.to("cpu")
        self.offload_text_encoders = True

    def negative(self, n: int) -> PromptEmbeds:
        """Embeddings of ``negative_prompt`` for ``n`` images (the CFG unconditional branch), cached."""
        if self._negative is None:
            self._negative = self.encode([self.negative_prompt])
        return self._negative.to(self.device).index(torch.zeros(n, dtype=torch.long))

    @contextmanager
    def _text_encoders_on(self, device: torch.device) -> Iterator[None]:
        """Move offloaded text encoders to ``device`` for the duration of the block."""
        if not self.offload_text_encoders:
            yield
            return
        self.text_encoders.to(device)
        try:
            yield
        finally:
            self.text_encoders.to("cpu")

    def _encode_unique(self, prompts: list[str]) -> PromptEmbeds:
        raise NotImplementedError

    def latent_shape(self, resolution: Resolution) -> tuple[int, int, int]:
        """(C, h, w) of the latents of an image of ``resolution`` pixels (int or (H, W))."""
        height, width = _pair(resolution)
        multiple = self._latent_scale * self._patch
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise UserInputError(
                f"resolution {height}x{width} must be a positive multiple of {multiple} "
                f"(latent factor {self._latent_scale} x patch {self._patch}) for this model"
            )
        return self._latent_channels, height // self._latent_scale, width // self._latent_scale

    def initial_noise(
        self,
        n: int,
        resolution: Resolution,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Standard normal latents (n, C, h, w) float32 on the model's device.

        ``generator`` may be a list of n generators (one per image, e.g. fixed eval seeds);
        CPU generators give the same noise on every device.
        """
        shape = (n, *self.latent_shape(resolution))
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def sigmas(self, num_steps: int, resolution: Resolution | None = None) -> torch.Tensor:
        """Noise levels (num_steps + 1,) float32 on the CPU: σ_0 = 1 > σ_1 > ... > σ_T = 0.

        From a fresh copy of the pipeline's flow-match scheduler, with its shift. Schedulers
        with dynamic shifting (FLUX) shift by the image size: they need ``resolution``.
        """
        if num_steps < 1:
            raise UserInputError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            if resolution is None:
                raise ValueError(f"sigmas() needs the resolution for {type(self).__name__}: its schedule depends on it")
            kwargs["mu"] = self._mu(resolution, num_steps)
        scheduler.set_timesteps(num_steps, sigmas=self._base_sigmas(num_steps), **kwargs)
        return scheduler.sigmas.to(dtype=torch.float32, device="cpu")

    def _image_tokens(self, resolution: Resolution) -> int:
        """Image tokens the transformer sees at ``resolution``."""
        _, h, w = self.latent_shape(resolution)
        return (h // self._patch) * (w // self._patch)

    def _mu(self, resolution: Resolution, num_steps: int) -> float:
        """The scheduler's resolution-dependent shift for this image size (diffusers' formula)."""
        config = self.pipe.scheduler.config
        names = {"base_seq_len": "base_image_seq_len", "max_seq_len": "max_image_seq_len",
                 "base_shift": "base_shift", "max_shift": "max_shift"}
        kwargs = {arg: config[key] for arg, key in names.items() if config.get(key) is not None}
        return calculate_shift(self._image_tokens(resolution), **kwargs)

    def _base_sigmas(self, num_steps: int) -> list[float] | None:
        """Unshifted sigmas the family's pipeline passes to the scheduler (None: its default)."""
        return None

    def velocity(
        self,
        latents: torch.Tensor,
        sigma: float | torch.Tensor,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
        uncond: PromptEmbeds | None = None,
        transformer: nn.Module | None = None,
    ) -> torch.Tensor:
        """Predicted velocity (N, C, h, w) float32 of latents (N, C, h, w) at noise level ``sigma``.

        ``sigma``: float or (N,). ``cond``: N rows. One call of ``transformer`` (default
        ``self.transformer``; pass the LoRA-, DDP- or FSDP-wrapped module to train it), with
        inputs cast to the transformer's dtype. Guidance is family-specific (see subclasses).
        """
        n = latents.shape[0]
        if len(cond) != n:
            raise ValueError(f"{n} latents but {len(cond)} conditioning rows")
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=latents.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(n)
        elif sigma.shape != (n,):
            raise ValueError(f"sigma must be a scalar or have shape ({n},), got {tuple(sigma.shape)}")
        transformer = transformer if transformer is not None else self.transformer
        return self._velocity(transformer, latents, sigma, cond.to(latents.device), guidance_scale, uncond)

    def _guidance_batch(
        self, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, uncond: PromptEmbeds | None
    ) -> tuple[torch.Tensor, torch.Tensor, PromptEmbeds]:
        """Latents, sigmas and conditioning of one CFG call: the unconditional rows (``uncond``, else
        ``negative_prompt``'s) first, then the conditional ones."""
        uncond = uncond if uncond is not None else self.negative(len(cond))
        return torch.cat([latents, latents]), torch.cat([sigma, sigma]), PromptEmbeds.cat([uncond.to(latents.device), cond])

    def _velocity(
        self,
        transformer: nn.Module,
        latents: torch.Tensor,
        sigma: torch.Tensor,
        cond: PromptEmbeds,
        guidance_scale: float,
        uncond: PromptEmbeds | None,
    ) -> torch.Tensor:
        """`velocity` after its checks; ``sigma`` is float32 (N,)."""
        raise NotImplementedError

    def _embedded_guidance(
        self, latents: torch.Tensor, guidance_scale: float, uncond: PromptEmbeds | None
    ) -> torch.Tensor | None:
        """``guidance_scale`` per image for a guidance-distilled transformer's guidance embedding
        (FLUX.1-dev, FLUX.2 [dev]); None when the transformer has none. These families have no
        unconditional branch, so ``uncond`` must be None."""
        if uncond is not None:
            raise ValueError(
                f"{self.family} uses its guidance embedding, not classifier-free guidance: pass uncond=None"
            )
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full((len(latents),), float(guidance_scale), device=latents.device, dtype=torch.float32)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Images (N, 3, H, W) float32 in [0, 1] from latents (N, C, h, w), ``batch_size`` per VAE call."""
        batch_size = batch_size or self.decode_batch_size
        images = []
        for chunk in latents.split(batch_size):
            decoded = self._decode_latents(chunk.to(device=self.vae.device, dtype=self.vae.dtype))
            images.append(self.pipe.image_processor.postprocess(decoded, output_type="pt").float())
        return torch.cat(images)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE output in [-1, 1] of latents in the VAE's dtype (the SD3 / FLUX.1 scaling and shift)."""
        config = self.vae.config
        return self.vae.decode(latents / config.scaling_factor + (config.shift_factor or 0.0), return_dict=False)[0]


def guided_velocity(out: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``v_u + g·(v_c - v_u)`` from the output of a `_guidance_batch` call (unconditional half first)."""
    v_uncond, v_cond = out.chunk(2)
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def linear_sigmas(num_steps: int) -> list[float]:
    """The unshifted sigmas FLUX, Qwen-Image and Z-Image pass to the scheduler: 1 to 1/T, evenly."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h·w/4, 4C): 2x2 patches as tokens, in raster order (FLUX.1, Qwen-Image)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_2x2(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_2x2`: (N, h·w/4, 4C) -> (N, C, h, w)."""
    n, _, channels = tokens.shape
    c = channels // 4
    return tokens.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def text_tokenizer(tokenizer):
    """The tokenizer itself (or None), or the one inside a processor (FLUX.2 [dev]'s PixtralProcessor)."""
    return tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer


def _pair(resolution: Resolution) -> tuple[int, int]:
    """(H, W) from an int or a pair."""
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


FAMILIES: dict[str, type[FlowModel]] = {}  # diffusers pipeline class name -> its FlowModel subclass


def register_family(cls: type[FlowModel]) -> type[FlowModel]:
    """Class decorator: the `FlowModel` subclass that serves ``cls.pipeline_class``."""
    name = cls.pipeline_class.__name__
    if name in FAMILIES and FAMILIES[name] is not cls:
        raise ValueError(f"two families serve {name}")
    FAMILIES[name] = cls
    return cls
