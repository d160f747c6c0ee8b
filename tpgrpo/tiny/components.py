"""Tiny SD3-architecture components, built offline with seeded random weights.

The pipeline is a real `diffusers.StableDiffusion3Pipeline` without T5: a small
`SD3Transformer2DModel`, a small `AutoencoderKL` (32x32 RGB <-> 8x8xC latent), two random
`CLIPTextModelWithProjection` text encoders sharing one locally built word-level tokenizer, and a
`FlowMatchEulerDiscreteScheduler`. `build_pipeline(num_layers=2)` is the test suite's stand-in
for SD3; `load_pipeline(DEFAULT_MODEL_DIR)` loads the pretrained tiny shapes model shipped with
the package (see ``tpgrpo/tiny/MODEL_CARD.md``).

Pass ``max_sequence_length=MAX_SEQUENCE_LENGTH`` to ``encode_prompt``/``__call__``: without T5
the pipeline appends that many zero tokens to the CLIP tokens, and 1 keeps the text short.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
MAX_SEQUENCE_LENGTH: int = 1

BOS, EOS, PAD, UNK = "<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
# Special tokens first. The end token must not get id 2: CLIP treats eos_token_id == 2 as its
# legacy configuration and pools at the largest token id instead of at the end token.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, UNK)

COLOR_WORDS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan", "orange", "white", "black", "gray")
SHAPE_WORDS: tuple[str, ...] = ("circle", "square", "triangle")
DEFAULT_VOCABULARY: tuple[str, ...] = (
    "a", "an", "the", "photo", "of", "and", "with", "one", "two", "three", "four",
    *COLOR_WORDS,
    *(word + plural for word in SHAPE_WORDS for plural in ("", "s")),
    "to", "left", "right", "above", "below", "on", "top", "bottom", "is", "are",
)


def phrase_token(color: str, shape: str) -> str:
    """The single token of "<color> <shape>" (and, plus "s", of its plural) under phrase tokens."""
    return f"{color}_{shape}"


def build_tokenizer(
    vocabulary: Sequence[str] | None = None, max_length: int = 16, phrase_tokens: bool = False
) -> PreTrainedTokenizerFast:
    """A CLIP-like word-level tokenizer made locally.

    Lower-cases, drops punctuation, splits on whitespace, wraps every text as
    ``<|startoftext|> words <|endoftext|>`` and maps unknown words to ``<|unk|>``.
    ``vocabulary`` defaults to the words of the shapes prompts; ``max_length`` is the padded
    length the SD3 pipeline uses (``model_max_length``). With ``phrase_tokens`` a colour word
    followed by a shape word ("green circle", "green circles") becomes one token
    (`phrase_token`): a model this small then reads which colour goes with which shape from one
    token instead of having to learn it from word order.
    """
    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (start, a word, end), got {max_length}")
    words = list(DEFAULT_VOCABULARY if vocabulary is None else vocabulary)
    clean = [w.lower() for w in words]
    if any(not w or any(ch.isspace() for ch in w) for w in clean):
        raise ValueError("vocabulary entries must be single non-empty words")
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    phrases = [(c, s) for c in COLOR_WORDS for s in SHAPE_WORDS] if phrase_tokens else []
    for word in clean + [phrase_token(c, s) + plural for c, s in phrases for plural in ("", "s")]:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
        + [normalizers.Replace(Regex(rf"\b{c}\s+{s}"), phrase_token(c, s)) for c, s in phrases]
    )
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=max_length,
    )


def _text_encoder(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int, projection_dim: int, num_layers: int, seed: int
) -> CLIPTextModelWithProjection:
    """A random CLIP text encoder with projection, sized for ``tokenizer``."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def build_vae(
    seed: int = 0,
    *,
    latent_channels: int = 8,
    block_out_channels: Sequence[int] = (32, 64, 64),
    image_size: int = 32,
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
) -> AutoencoderKL:
    """A small random `AutoencoderKL`: (B, 3, S, S) <-> (B, latent_channels, S/f, S/f).

    ``f = 2 ** (len(block_out_channels) - 1)`` (4 by default: 32x32 images, 8x8 latents).
    """
    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=min(32, min(block_out_channels)),
        sample_size=image_size,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def build_pipeline(
    seed: int = 0,
    *,
    num_layers: int = 2,
    sample_size: int = 8,
    latent_channels: int = 8,
    num_attention_heads: int = 4,
    attention_head_dim: int = 48,
    text_hidden_size: int = 64,
    text_projection_dim: int = 64,
    text_layers: int = 2,
    vae_channels: Sequence[int] = (32, 64, 64),
    vocabulary: Sequence[str] | None = None,
    max_length: int = 16,
    phrase_tokens: bool = False,
    shift: float = 3.0,
) -> StableDiffusion3Pipeline:
    """A tiny `StableDiffusion3Pipeline` with seeded random weights (no T5).

    Latents are (B, latent_channels, sample_size, sample_size); images are
    (B, 3, sample_size * f, sample_size * f) with the VAE factor ``f = 2 ** (len(vae_channels) - 1)``
    (32x32 by default). The transformer has ``num_layers`` joint blocks of width
    ``num_attention_heads * attention_head_dim``; the text sequence is ``max_length`` CLIP tokens
    plus ``max_sequence_length`` zero tokens.
    """
    if sample_size % 2:
        raise ValueError(f"sample_size must be even (patch size 2), got {sample_size}")
    tokenizer = build_tokenizer(vocabulary, max_length, phrase_tokens)
    inner = num_attention_heads * attention_head_dim
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=2 * text_hidden_size,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * text_projection_dim,
        pos_embed_max_size=sample_size // 2,
        qk_norm="rms_norm",
    )
    vae = build_vae(
        seed + 1,
        latent_channels=latent_channels,
        block_out_channels=vae_channels,
        image_size=sample_size * 2 ** (len(vae_channels) - 1),
    )
    encoders = [
        _text_encoder(tokenizer, text_hidden_size, text_projection_dim, text_layers, seed + 2 + i) for i in range(2)
    ]
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def save_pipeline(pipe: StableDiffusion3Pipeline, path: str | os.PathLike) -> Path:
    """``save_pretrained`` so that the plain diffusers load samples: the transformer and VAE in float16,
    the text encoders in float32.

    ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``
    gives diffusers models in float32 whatever their files hold, but transformers models in the
    dtype of their files: float16 text encoders would feed float16 embeddings to a float32
    transformer ("Input type (c10::Half) and bias type (float) should be the same"). The
    pipeline's modules are cast in place.
    """
    pipe.transformer.to(torch.float16)
    pipe.vae.to(torch.float16)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.to(torch.float32)
    pipe.save_pretrained(path, safe_serialization=True)
    return Path(path)


def load_pipeline(path: str | os.PathLike = DEFAULT_MODEL_DIR, dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """Load a pipeline saved by ``save_pretrained`` (the shipped tiny model by default).

    The tiny model has no T5 and no image encoder, so those components are passed as ``None``.
    """
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ValueError(f"{path} is not a saved diffusers pipeline (no model_index.json)")
    with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older lack dtype
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        return StableDiffusion3Pipeline.from_pretrained(
            path,
            text_encoder_3=None,
            tokenizer_3=None,
            image_encoder=None,
            feature_extractor=None,
            torch_dtype=dtype,
        )
