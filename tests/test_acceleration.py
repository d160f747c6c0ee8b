"""Compiler and attention-kernel options (tpgrpo/acceleration.py, model.compute)."""
import pytest
import torch

from tpgrpo.acceleration import attention_processors, compile_blocks, compiler_available, set_attention_backend
from tpgrpo.errors import UserInputError
from tpgrpo.settings import ComputeConfig


@pytest.fixture
def restore_active_backend():
    """diffusers keeps the active attention backend in a global registry: put native back."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    yield
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


def _flux_transformer():
    from tests.helpers.tiny_models import tiny_flux_pipeline

    return tiny_flux_pipeline().transformer.eval()


def _flux_inputs(transformer, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    tokens, text = 16, 4
    return dict(
        hidden_states=torch.randn(1, tokens, config.in_channels, generator=generator),
        encoder_hidden_states=torch.randn(1, text, config.joint_attention_dim, generator=generator),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]) if config.guidance_embeds else None,
        txt_ids=torch.zeros(text, 3),
        img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(-1, 3),
        return_dict=False,
    )


def test_a_diffusers_attention_backend_is_set_on_every_processor_and_computes_the_same(restore_active_backend):
    transformer = _flux_transformer()
    inputs = _flux_inputs(transformer)
    with torch.no_grad():
        native = transformer(**inputs)[0]
    set_attention_backend(transformer, "_native_math")
    assert {str(p._attention_backend.value) for p in attention_processors(transformer)} == {"_native_math"}
    with torch.no_grad():
        math_kernel = transformer(**inputs)[0]
    torch.testing.assert_close(math_kernel, native, rtol=1e-4, atol=1e-5)


def test_native_leaves_the_processors_alone():
    transformer = _flux_transformer()
    set_attention_backend(transformer, "native")
    assert all(p._attention_backend is None for p in attention_processors(transformer))


def test_sd3_processors_accept_only_native(tiny_model_dir):
    from tpgrpo.tiny.components import load_pipeline

    transformer = load_pipeline(tiny_model_dir).transformer
    with pytest.raises(UserInputError, match="JointAttnProcessor2_0 uses|uses JointAttnProcessor2_0") as error:
        set_attention_backend(transformer, "_native_math")
    assert "use 'native'" in str(error.value)


def test_a_backend_whose_package_is_missing_is_one_clear_error(restore_active_backend):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(UserInputError, match="'flash' is not usable here: .*flash-attn"):
        set_attention_backend(_flux_transformer(), "flash")


@pytest.mark.parametrize(
    "settings, message",
    [({"attention_backend": "flashy"}, "compute.attention_backend must be native"), ({"compile_mode": "fast"}, "compute.compile_mode")],
)
def test_compute_settings_are_checked(settings, message):
    with pytest.raises(UserInputError, match=message):
        ComputeConfig(**settings)


@pytest.mark.slow  # compiling takes minutes on a 2-core CPU: `make test-all` runs it, and benchmarks/gpu_check.py on a GPU
def test_compiled_blocks_give_the_eager_rollout(tiny_model_dir):
    """torch.compile of each block (model.compute.compile) changes no number beyond float tolerance."""
    available, reason = compiler_available()
    if not available:
        pytest.skip(reason)
    from tpgrpo.families import FlowModel
    from tpgrpo.maths.rollout import rollout
    from tpgrpo.maths.sde import step_kind
    from tpgrpo.tiny.components import load_pipeline

    flow = FlowModel.from_pipeline(load_pipeline(tiny_model_dir), max_sequence_length=1)
    cond = flow.encode(["a photo of a circle", "a photo of two squares"])

    def velocity(latents, sigma, rows):
        return flow.velocity(latents, sigma, cond.index(rows), guidance_scale=1.0)

    noise = flow.initial_noise(2, 32, torch.Generator().manual_seed(0))
    step_noise = torch.randn(2, 2, *noise.shape[1:], generator=torch.Generator().manual_seed(1))
    kwargs = dict(sigmas=flow.sigmas(3, 32), window_start=0, window_size=2, step=step_kind("cps", 0.7), step_noise=step_noise)
    with torch.no_grad():
        eager = rollout(velocity, noise, **kwargs)
        assert compile_blocks(flow.transformer) == 2
        compiled = rollout(velocity, noise, **kwargs)
    torch.testing.assert_close(compiled.final_latents, eager.final_latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.log_probs, eager.log_probs, rtol=1e-4, atol=1e-4)
