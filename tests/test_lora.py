"""LoRA helpers: only LoRA trains, the disabled adapter is the base model, diffusers-format export."""
import pytest
import torch

from tpgrpo.errors import UserInputError
from tpgrpo.lora import (
    ATTENTION_PROJECTIONS,
    DEFAULT_TARGET_MODULES,
    add_lora,
    disabled_adapter,
    load_lora,
    lora_parameters,
    lora_state_dict,
    save_lora,
)
from tpgrpo.tiny import build_pipeline

RANK, ALPHA = 4, 8


def inputs(transformer, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(
        hidden_states=torch.randn(n, config.in_channels, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(n, 13, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(n, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([700.0, 300.0])[:n],
    )


@torch.no_grad()
def output(transformer, x):
    return transformer(**x, return_dict=False)[0]


def perturb(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture
def pipe():
    return build_pipeline(seed=0, num_layers=2)


def test_only_lora_trains_and_starts_as_the_base_model(pipe):
    transformer = pipe.transformer
    x = inputs(transformer)
    base = output(transformer, x)
    params = add_lora(transformer, rank=RANK, alpha=ALPHA)
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {id(p) for p in params} == {id(p) for p in transformer.parameters() if p.requires_grad}
    assert lora_parameters(transformer) == params and all(p.dtype == torch.float32 for p in params)
    assert torch.equal(output(transformer, x), base)  # gaussian init: B = 0
    adapted = {name.split(".lora_")[0] for name, _ in transformer.named_parameters() if "lora_A" in name}
    assert all(any(name.endswith(t) for t in ATTENTION_PROJECTIONS) for name in adapted)
    assert {name.rsplit(".", 2)[-2] if name.endswith(".0") else name.rsplit(".", 1)[-1] for name in adapted} == {
        "to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"
    }


def test_disabled_adapter_is_exactly_the_base_model(pipe):
    transformer = pipe.transformer
    x = inputs(transformer)
    base = output(transformer, x)
    params = add_lora(transformer, rank=RANK, alpha=ALPHA)
    perturb(params)
    adapted = output(transformer, x)
    assert not torch.allclose(adapted, base)
    with disabled_adapter(transformer):
        assert torch.equal(output(transformer, x), base)
    assert torch.equal(output(transformer, x), adapted)
    assert all(p.requires_grad for p in params)  # restored after the block


def test_gradients_reach_only_lora(pipe):
    transformer = pipe.transformer
    params = add_lora(transformer, rank=RANK, alpha=ALPHA)
    perturb(params)
    transformer(**inputs(transformer), return_dict=False)[0].square().mean().backward()
    assert all(p.grad is not None for p in params)
    # Zero only where the output cannot depend on it: the text queries of the last block.
    dead = [name for name, p in transformer.named_parameters() if p.requires_grad and not p.grad.abs().sum() > 0]
    assert all(name.startswith("transformer_blocks.1.attn.add_q_proj.") for name in dead)
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)


def test_save_then_diffusers_load_lora_weights_reproduces_outputs(pipe, tmp_path):
    transformer = pipe.transformer
    perturb(add_lora(transformer, rank=RANK, alpha=ALPHA))
    x = inputs(transformer)
    expected = output(transformer, x)
    assert save_lora(transformer, tmp_path) == tmp_path
    assert (tmp_path / "pytorch_lora_weights.safetensors").is_file()

    fresh = build_pipeline(seed=0, num_layers=2)
    fresh.load_lora_weights(tmp_path)  # plain diffusers: rank and alpha come from the saved metadata
    assert torch.equal(output(fresh.transformer, x), expected)

    again = build_pipeline(seed=0, num_layers=2)
    add_lora(again.transformer, rank=RANK, alpha=ALPHA)
    load_lora(again.transformer, tmp_path)
    assert torch.equal(output(again.transformer, x), expected)


def test_lora_state_dict_keys_are_diffusers_format(pipe):
    params = add_lora(pipe.transformer, rank=RANK, alpha=ALPHA)
    state = lora_state_dict(pipe.transformer)
    assert len(state) == len(params)
    assert "transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert all(".default." not in key and value.device.type == "cpu" for key, value in state.items())


def test_load_lora_errors(pipe, tmp_path):
    add_lora(pipe.transformer, rank=RANK, alpha=ALPHA)
    save_lora(pipe.transformer, tmp_path / "r4")
    other = build_pipeline(seed=0, num_layers=2)
    add_lora(other.transformer, rank=2 * RANK, alpha=ALPHA)
    with pytest.raises(UserInputError, match=r"the LoRA in .*r4 does not fit this model: .*size mismatch") as error:
        load_lora(other.transformer, tmp_path / "r4")
    assert "\n" not in str(error.value)
    with pytest.raises(UserInputError, match="cannot read a LoRA from"):
        load_lora(other.transformer, tmp_path / "missing")


def test_add_lora_errors(pipe):
    with pytest.raises(UserInputError, match="LoRA rank must be >= 1"):
        add_lora(pipe.transformer, rank=0)
    with pytest.raises(UserInputError, match="cannot add LoRA to SD3Transformer2DModel"):
        add_lora(pipe.transformer, target_modules=["no_such_layer"])


def test_family_defaults(pipe):
    assert DEFAULT_TARGET_MODULES["sd3"] == DEFAULT_TARGET_MODULES["flux"] == ATTENTION_PROJECTIONS
    assert len(add_lora(pipe.transformer, rank=RANK, family="sd3")) == len(add_lora_count(ATTENTION_PROJECTIONS))
    with pytest.raises(UserInputError, match="unknown model family 'sdxl'"):
        add_lora(build_pipeline(seed=0, num_layers=2).transformer, family="sdxl")


def add_lora_count(targets):
    fresh = build_pipeline(seed=0, num_layers=2).transformer
    return add_lora(fresh, rank=RANK, target_modules=targets)
