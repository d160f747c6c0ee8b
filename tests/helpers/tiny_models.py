"""Tiny random stand-ins of the real model classes, built offline (no download)."""
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    GotOcr2Config,
    GotOcr2ForConditionalGeneration,
    GotOcr2ImageProcessorPil,
    GotOcr2Processor,
    Mask2FormerConfig,
    Mask2FormerForUniversalSegmentation,
    Mask2FormerImageProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
    SwinConfig,
    T5Config,
    T5EncoderModel,
)

from tpgrpo.rewards.geneval_detector import COLORS, GENEVAL_OBJECTS, color_prompts
from tpgrpo.tiny import build_tokenizer

# COCO's names as a detector's id2label spells them ("mouse", not GenEval's "computer mouse").
COCO_LABELS = [
    {"computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard"}.get(name, name)
    for name in GENEVAL_OBJECTS
]
DOG = GENEVAL_OBJECTS.index("dog")


def save_tiny_detector(path, labels=COCO_LABELS, seed=0):
    """A random Mask2Former (tiny Swin backbone, 8 queries) whose queries all say "dog", and its processor."""
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      window_size=4, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=8,
        id2label=dict(enumerate(labels)),
    )
    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        model.class_predictor.weight.zero_()
        model.class_predictor.bias.fill_(-10.0)
        model.class_predictor.bias[DOG] = 10.0
    model.save_pretrained(path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(path)
    return str(path)


def save_tiny_clip(path, words, projection_dim=16, seed=0):
    """A random 1-layer CLIP (32x32 images) with a word-level tokenizer of ``words``, and its CLIPProcessor."""
    tokenizer = build_tokenizer(sorted(set(words)), max_length=77)
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def save_tiny_geneval_clip(path, seed=0):
    """A tiny CLIP whose tokenizer knows the words of GenEval's colour templates."""
    words = {w for name in GENEVAL_OBJECTS for w in color_prompts(name)[0].replace("-", " ").split()}
    return save_tiny_clip(path, words | set(COLORS) | {"colored", "object"}, seed=seed)


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """FLUX with 2 transformer blocks, CLIP and T5 of width 32, a 2x VAE (16x16 images, 8x8x4 latents)."""
    tokenizer = build_tokenizer(max_length=8)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, **ids,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0,
    ))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=16,
        scaling_factor=0.5, shift_factor=0.1,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer,
        transformer=transformer,
    )


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<imgpad>"]


# the max_sequence_length each newer family's stand-in runs with: its byte-level tokenizer spends a token
# per character of the chat template (FLUX.2 [dev]'s holds a 168-character system message)
SEQUENCE_LENGTHS = {"flux": 6, "qwenimage": 200, "flux2": 96, "flux2-dev": 256, "zimage": 96}


def tiny_tokenizer(special_tokens=SPECIAL_TOKENS):
    """Byte-level tokenizer without merges (every byte one token) plus ``special_tokens`` (GOT-OCR2's and Qwen's)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={char: i for i, char in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", additional_special_tokens=list(special_tokens)
    )


# the Qwen chat format the FLUX.2 [klein] and Z-Image pipelines apply to each prompt
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer():
    """`tiny_tokenizer` with a Qwen-style chat template."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _special_ids(tokenizer):
    return dict(bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def _qwen3(tokenizer, model_class, num_layers, hidden_size):
    return model_class(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=32, num_hidden_layers=num_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
        **_special_ids(tokenizer),
    ))


def _small_vae(vae_class, **kwargs):
    """A 2x VAE of width 16 (32x32 images, 16x16 latents)."""
    return vae_class(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32, **kwargs,
    )


def tiny_qwenimage_pipeline(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image with one transformer block, a 1-layer Qwen2.5-VL of width 16 and a 2x video VAE
    (32x32 images, 16x16x4 latents); the scheduler is Qwen-Image's (dynamic shift, terminal 0.02)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]}, **_special_ids(tokenizer)),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]),
        vocab_size=len(tokenizer), **_special_ids(tokenizer),
    ))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 2.0, 0.8, 1.2])
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                              axes_dims_rope=(4, 6, 6))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)


def _flux2_parts(guidance_embeds: bool):
    """A 2x FLUX.2 VAE, a FLUX.2 transformer of one double and one single block (text width 24) and FLUX.2's scheduler."""
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
    return _small_vae(AutoencoderKLFlux2), transformer, scheduler


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False) -> Flux2KleinPipeline:
    """FLUX.2 [klein] with one double and one single block, a 28-layer Qwen3 of width 8 (the
    pipeline stacks layers 9, 18 and 27) and a 2x VAE (32x32 images, 8x8x16 patchified latents)."""
    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _qwen3(tokenizer, Qwen3ForCausalLM, num_layers=28, hidden_size=8)
    vae, transformer, scheduler = _flux2_parts(guidance_embeds=False)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)


# the Mistral chat format: the FLUX.2 [dev] pipeline sends its system message and the prompt as text parts
MISTRAL_SPECIAL_TOKENS = ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "[IMG]"]
MISTRAL_CHAT_TEMPLATE = (
    "{% for m in messages %}{% set tag = 'SYSTEM_PROMPT' if m['role'] == 'system' else 'INST' %}"
    "[{{ tag }}]{% for part in m['content'] %}{{ part['text'] }}{% endfor %}[/{{ tag }}]{% endfor %}"
)


def tiny_flux2_dev_pipeline(seed: int = 0) -> Flux2Pipeline:
    """FLUX.2 [dev] with one double and one single block and a guidance embedding, a Mistral 3 of
    30 layers of width 8 (the pipeline stacks layers 10, 20 and 30) with a 1-layer Pixtral vision
    tower, and a 2x VAE (32x32 images, 8x8x16 patchified latents). The hub pipeline's tokenizer is a
    PixtralProcessor, which needs torchvision; for text a processor only applies its chat template
    and calls its tokenizer, so the stand-in is a tokenizer with the Mistral chat format
    (`processor_wrapped` puts it inside a processor, as the hub's is)."""
    tokenizer = tiny_tokenizer(SPECIAL_TOKENS + MISTRAL_SPECIAL_TOKENS)
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                         num_hidden_layers=30, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         max_position_embeddings=1024, **_special_ids(tokenizer)),
        vision_config=dict(model_type="pixtral", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=4, patch_size=4, image_size=32),
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2,
    ))
    vae, transformer, scheduler = _flux2_parts(guidance_embeds=True)
    return Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)


def processor_wrapped(tokenizer):
    """``tokenizer`` inside a processor with its chat template (a CLIPProcessor: it needs no
    torchvision), the way FLUX.2 [dev]'s hub pipeline holds its tokenizer in a PixtralProcessor."""
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer)
    processor.chat_template = tokenizer.chat_template  # CLIPProcessor's constructor takes none
    return processor


def tiny_zimage_pipeline(seed: int = 0) -> ZImagePipeline:
    """Z-Image with one main and one refiner block each, a 2-layer Qwen3 of width 16 and a 2x VAE
    (32x32 images, 16x16x4 latents); the scheduler is Z-Image's (static shift 3)."""
    tokenizer = chat_tokenizer()
    torch.manual_seed(seed)
    text_encoder = _qwen3(tokenizer, Qwen3Model, num_layers=2, hidden_size=16)
    vae = _small_vae(AutoencoderKL, scaling_factor=0.5, shift_factor=0.1)
    transformer = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2,
                                           n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def save_tiny_got_ocr2(path):
    """A random 1-layer GOT-OCR2 (64-px images, 16 image tokens) and its processor, saved in ``path``."""
    tokenizer = tiny_tokenizer()
    processor = GotOcr2Processor(image_processor=GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}),
                                 tokenizer=tokenizer)
    config = GotOcr2Config(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=32),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256),
        image_token_index=tokenizer.convert_tokens_to_ids("<imgpad>"),
    )
    torch.manual_seed(0)
    GotOcr2ForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


# each real-model family's config and the builder of its tiny stand-in (the family tests and the GPU check)
STAND_INS = {
    "flux": ("configs/flux.yaml", tiny_flux_pipeline),
    "qwenimage": ("configs/qwenimage.yaml", tiny_qwenimage_pipeline),
    "flux2": ("configs/flux2_klein.yaml", tiny_flux2_klein_pipeline),
    "flux2-dev": ("configs/flux2_dev.yaml", tiny_flux2_dev_pipeline),
    "zimage": ("configs/zimage.yaml", tiny_zimage_pipeline),
}
