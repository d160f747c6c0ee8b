"""Memory figures from the architecture configs (tpgrpo.memory), checked against hand formulas
and published parameter totals. Everything is built on the meta device except two tiny models."""
import math

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from tpgrpo import memory
from tpgrpo.errors import UserInputError
from tpgrpo.lora import DEFAULT_TARGET_MODULES, add_lora, lora_parameters

GIB = 1024**3


def clip_text_parameters(hidden, layers, intermediate, vocab, positions, projection=None):
    """CLIP text tower by hand: token and position embeddings; per layer q/k/v/out (with biases),
    two layer norms and a two-layer MLP; a final layer norm; the projection has no bias."""
    embeddings = vocab * hidden + positions * hidden
    attention = 4 * (hidden * hidden + hidden)
    mlp = hidden * intermediate + intermediate + intermediate * hidden + hidden
    layer_norms = 2 * 2 * hidden
    total = embeddings + layers * (attention + mlp + layer_norms) + 2 * hidden
    return total + (hidden * projection if projection else 0)


def t5_encoder_parameters(d_model, d_kv, heads, d_ff, layers, vocab, buckets=32):
    """T5 v1.1 encoder by hand: shared embedding; per layer q/k/v/o without biases, a gated FF
    (wi_0, wi_1, wo) and two RMS norms (weights only); one relative-position table; final norm."""
    inner = d_kv * heads
    per_layer = 4 * d_model * inner + 3 * d_model * d_ff + 2 * d_model
    return vocab * d_model + layers * per_layer + buckets * heads + d_model


def test_a_one_layer_clip_text_model_counts_as_the_hand_formula():
    config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                  vocab_size=100, max_position_embeddings=7, projection_dim=16, bos_token_id=0, eos_token_id=1,
                  pad_token_id=1)
    module = memory.Component(CLIPTextModelWithProjection, config, CLIPTextConfig).build_on_meta()
    assert all(param.is_meta for param in module.parameters())
    # 100*32 + 7*32 embeddings, 4*(32*32 + 32) attention, 32*64 + 64 + 64*32 + 32 MLP, 4*32 layer norms,
    # 2*32 final norm, 32*16 projection
    assert memory.module_size(module).parameters == clip_text_parameters(32, 1, 64, 100, 7, 16) == 12_544


def test_the_real_text_encoders_count_as_the_hand_formulas():
    sd3, flux = memory.parameter_counts("sd3"), memory.parameter_counts("flux")
    assert sd3["text_encoder"] == clip_text_parameters(768, 12, 3072, 49408, 77, 768)
    assert sd3["text_encoder_2"] == clip_text_parameters(1280, 32, 5120, 49408, 77, 1280)
    assert sd3["text_encoder_3"] == flux["text_encoder_2"] == t5_encoder_parameters(4096, 64, 64, 10240, 24, 32128)
    assert flux["text_encoder"] == clip_text_parameters(768, 12, 3072, 49408, 77)


def test_counts_are_within_the_published_totals():
    sd3, flux = memory.parameter_counts("sd3"), memory.parameter_counts("flux")
    assert 2.2e9 <= sd3["transformer"] <= 2.5e9  # SD3.5 Medium: "2.5 B" with its position table
    assert 4.7e9 <= sd3["text_encoder_3"] <= 4.8e9  # T5-XXL encoder
    assert 120e6 <= sd3["text_encoder"] <= 125e6  # CLIP-L text, about 123 M
    assert 690e6 <= sd3["text_encoder_2"] <= 700e6  # OpenCLIP bigG text, about 694 M
    assert 11.8e9 <= flux["transformer"] <= 12.0e9  # FLUX.1-dev: "12 B", about 11.9 B
    assert 80e6 <= sd3["vae"] == flux["vae"] <= 90e6  # the 16-channel VAE, about 84 M
    assert set(sd3) == {"transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"}
    assert set(flux) == {"transformer", "text_encoder", "text_encoder_2", "vae"}


def test_sd3_position_table_is_a_buffer_counted_with_the_weights():
    sizes = memory.component_sizes("sd3")
    assert sizes["transformer"].floating_buffers == 384 * 384 * 1536  # pos_embed_max_size^2 x hidden
    assert memory.component_sizes("flux")["transformer"].floating_buffers == 0
    ddp = memory.memory_table("sd3", "float32", "ddp", 1, 32)
    assert ddp["transformer (frozen)"] == 4 * (sizes["transformer"].parameters + 384 * 384 * 1536)


@pytest.mark.parametrize("rank", [4, 32])
def test_lora_counts_match_the_projections_counted_by_hand(rank):
    # SD3.5 Medium: 24 joint blocks of eight 1536x1536 projections, the last without to_add_out
    # (context_pre_only); attn2 is not a target. FLUX.1-dev: 19 double blocks of eight and 38
    # single blocks of three (q/k/v) 3072x3072 projections.
    assert memory.lora_parameter_count("sd3", rank) == (24 * 8 - 1) * (1536 + 1536) * rank
    assert memory.lora_parameter_count("flux", rank) == (19 * 8 + 38 * 3) * (3072 + 3072) * rank


def test_sd35_large_builds_on_the_meta_device_with_its_published_size():
    large, medium = memory.parameter_counts("sd35-large"), memory.parameter_counts("sd3")
    assert 8.0e9 <= large["transformer"] <= 8.1e9  # SD3.5 Large: "8.1 B"
    assert {k: v for k, v in large.items() if k != "transformer"} == {k: v for k, v in medium.items() if k != "transformer"}
    assert memory.component_sizes("sd35-large")["transformer"].floating_buffers == 192 * 192 * 2432
    transformer = memory.PIPELINES["sd35-large"]["transformer"].build_on_meta()
    assert len(transformer.transformer_blocks) == 38 and all(p.is_meta for p in transformer.parameters())
    assert not any(block.attn2 for block in transformer.transformer_blocks)  # no dual-attention layers
    # 38 joint blocks of eight 2432x2432 projections, the last without to_add_out (context_pre_only)
    assert memory.lora_parameter_count("sd35-large", 16) == (38 * 8 - 1) * (2432 + 2432) * 16


def test_the_newer_families_count_as_published():
    qwen, klein, zimage = (memory.parameter_counts(name) for name in ("qwenimage", "flux2-klein-4b", "zimage"))
    assert 20.3e9 <= qwen["transformer"] <= 20.5e9  # Qwen-Image: "20 B"
    assert 8.2e9 <= qwen["text_encoder"] <= 8.3e9  # Qwen2.5-VL-7B with its vision tower, about 8.29 B
    assert 3.8e9 <= klein["transformer"] <= 3.9e9  # FLUX.2 [klein] "4B"
    assert 6.1e9 <= zimage["transformer"] <= 6.2e9  # Z-Image: "6 B"
    assert 4.0e9 <= klein["text_encoder"] == zimage["text_encoder"] <= 4.05e9  # Qwen3-4B, embeddings tied
    assert zimage["vae"] == memory.parameter_counts("flux")["vae"]  # FLUX.1's VAE
    dev = memory.parameter_counts("flux2-dev")
    assert 32.1e9 <= dev["transformer"] <= 32.3e9  # FLUX.2 [dev]: "32 B"
    assert 23.9e9 <= dev["text_encoder"] <= 24.1e9  # Mistral Small 3: "24 B"
    assert dev["vae"] == klein["vae"]


@pytest.mark.parametrize("rank", [4, 32])
def test_newer_family_lora_counts_match_the_projections_counted_by_hand(rank):
    # Qwen-Image: 60 blocks of eight 3072x3072 projections. Z-Image: 30 main and 2 + 2 refiner blocks
    # of four 3840x3840 ones. FLUX.2 [klein] 4B: 5 double blocks of eight 3072x3072 ones and 20 single
    # blocks of one fused projection 3072 -> 3 x 3072 (q, k, v) + 2 x 9216 (the gated MLP's input).
    assert memory.lora_parameter_count("qwenimage", rank) == 60 * 8 * (3072 + 3072) * rank
    assert memory.lora_parameter_count("zimage", rank) == 34 * 4 * (3840 + 3840) * rank
    fused = 3072 + 3 * 3072 + 2 * 9216
    assert memory.lora_parameter_count("flux2-klein-4b", rank) == (5 * 8 * (3072 + 3072) + 20 * fused) * rank
    fused = 6144 + 3 * 6144 + 2 * 18432  # FLUX.2 [dev]: 8 double and 48 single blocks of width 6144
    assert memory.lora_parameter_count("flux2-dev", rank) == (8 * 8 * (6144 + 6144) + 48 * fused) * rank


TINY_SD3 = dict(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
                 axes_dims_rope=(2, 2, 4))


@pytest.mark.parametrize("family, model_class, config", [
    ("sd3", SD3Transformer2DModel, TINY_SD3), ("flux", FluxTransformer2DModel, TINY_FLUX),
])
@pytest.mark.parametrize("rank", [1, 4])
def test_summing_the_linear_layers_agrees_with_peft(family, model_class, config, rank):
    torch.manual_seed(0)
    transformer = model_class(**config)
    summed = memory.lora_parameter_count_of(transformer, rank, DEFAULT_TARGET_MODULES[family])
    added = sum(param.numel() for param in add_lora(transformer, rank=rank, family=family))
    assert summed == added == sum(param.numel() for param in lora_parameters(transformer)) > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_bfloat16_halves_the_frozen_parts_and_leaves_the_lora_state(family):
    float32 = memory.memory_table(family, "float32", "ddp", 1, 32)
    bfloat16 = memory.memory_table(family, torch.bfloat16, "ddp", 1, 32)
    for part in ("transformer (frozen)", "text encoders", "VAE"):
        assert bfloat16[part] * 2 == float32[part] > 0
    for part in ("LoRA weights", "AdamW state", "gradients"):
        assert bfloat16[part] == float32[part]
    lora = memory.lora_parameter_count(family, 32)
    assert float32["LoRA weights"] == float32["gradients"] == 4 * lora
    assert float32["AdamW state"] == 2 * 4 * lora


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("world_size", [2, 8])
def test_fsdp2_divides_the_sharded_parts_and_replicates_the_rest(family, world_size):
    ddp = memory.memory_table(family, "bfloat16", "ddp", world_size, 32)
    fsdp2 = memory.memory_table(family, "bfloat16", "fsdp2", world_size, 32)
    assert ddp == memory.memory_table(family, "bfloat16", "ddp", 1, 32)  # ddp ignores the world size
    for part in ("LoRA weights", "AdamW state", "gradients"):
        assert fsdp2[part] == math.ceil(ddp[part] / world_size)
    for part in ("text encoders", "VAE"):
        assert fsdp2[part] == ddp[part]
    buffer_bytes = 2 * memory.component_sizes(family)["transformer"].floating_buffers
    sharded = ddp["transformer (frozen)"] - buffer_bytes
    assert fsdp2["transformer (frozen)"] == math.ceil(sharded / world_size) + buffer_bytes


def test_released_text_encoders_take_no_accelerator_memory():
    on = memory.memory_table("sd3", "bfloat16", "ddp", 1, 32, text_encoders_on_device=True)
    off = memory.memory_table("sd3", "bfloat16", "ddp", 1, 32, text_encoders_on_device=False)
    assert off["text encoders"] == 0 < on["text encoders"]
    others = [part for part in on if part != "text encoders"]
    assert [on[part] for part in others] == [off[part] for part in others]


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserInputError, match=r"unknown model 'sdxl'; use one of \['flux', 'flux2-dev', 'flux2-klein-4b', 'qwenimage', 'sd3', 'sd35-large', 'zimage'\]"):
        memory.parameter_counts("sdxl")
    with pytest.raises(UserInputError, match="strategy"):
        memory.memory_table("sd3", "bfloat16", "zero3", 8, 32)
    with pytest.raises(UserInputError, match="world_size"):
        memory.memory_table("sd3", "bfloat16", "fsdp2", 0, 32)
    with pytest.raises(UserInputError, match="rank"):
        memory.lora_parameter_count("sd3", 0)


def parse_row(line):
    return [cell.strip().strip("*") for cell in line.strip().strip("|").split("|")]


def test_the_cli_prints_a_gib_table(capsys):
    memory.main(["--family", "flux", "--world-size", "4", "--lora-rank", "16"])
    out = capsys.readouterr().out
    assert "FLUX.1-dev" in out and "world size 4" in out and "LoRA rank 16" in out and "no activations" in out
    rows = [parse_row(line) for line in out.splitlines() if line.startswith("|")]
    assert rows[0] == ["part", "parameters", "float32 ddp", "float32 fsdp2", "bfloat16 ddp", "bfloat16 fsdp2"]
    body = {row[0]: [float(cell) for cell in row[2:]] for row in rows[2:]}
    parts = ["transformer (frozen)", "text encoders", "VAE", "LoRA weights", "AdamW state", "gradients"]
    assert list(body)[:6] == parts
    for column in range(4):
        total = sum(body[part][column] for part in parts)
        assert body["total, text encoders on device"][column] == pytest.approx(total, abs=0.01 * len(parts))
        released = total - body["text encoders"][column]
        assert body["total, text encoders released"][column] == pytest.approx(released, abs=0.01 * len(parts))
    # bfloat16 ddp transformer: the hand-checkable FLUX count bounds it (11.8-12.0 B params x 2 bytes)
    assert 11.8e9 * 2 / GIB <= body["transformer (frozen)"][2] <= 12.0e9 * 2 / GIB
    # the LoRA row: 266 projections of 3072 -> 3072 at rank 16, float32
    assert body["LoRA weights"][0] == pytest.approx(266 * 6144 * 16 * 4 / GIB, abs=0.005)


def test_the_tables_in_docs_memory_md_are_what_their_commands_print(capsys):
    """Each ```bash block of docs/memory.md is followed by exactly what its command prints."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "memory.md").read_text()
    commands = re.findall(r"```bash\npython -m tpgrpo\.memory (.*)\n```\n\n", text)
    assert len(commands) == 7  # SD3.5 Medium and Large, FLUX.1, Qwen-Image, FLUX.2 [klein] and [dev], Z-Image
    for arguments in commands:
        memory.main(shlex.split(arguments))
        printed = capsys.readouterr().out
        assert f"{arguments}\n```\n\n{printed}" in text, arguments
