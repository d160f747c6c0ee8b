"""FlowModel on tiny random SD3 and FLUX pipelines: shapes, conventions against diffusers' own
sampling loops, CFG batching, decoding, loading and its errors."""
import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tpgrpo.errors import UserInputError
from tpgrpo.families import FluxModel, FlowModel, ModelLoadError, PromptEmbeds, SD3Model, load_flow_model
from tpgrpo.tiny import MAX_SEQUENCE_LENGTH, build_pipeline
from tests.helpers.sampling import euler_sample
from tests.helpers.tiny_models import tiny_flux_pipeline

PROMPTS = ["a photo of two red circles", "a blue square"]


# ------------------------------------------------------------------------------------ SD3
@pytest.fixture(scope="module")
def sd3():
    return FlowModel.from_pipeline(build_pipeline(seed=0, num_layers=2), max_sequence_length=MAX_SEQUENCE_LENGTH)


def test_sd3_is_frozen_and_keeps_frozen_parts_in_eval(sd3):
    assert isinstance(sd3, SD3Model) and sd3.family == "sd3"
    assert not any(p.requires_grad for p in sd3.parameters())
    sd3.train()
    assert sd3.transformer.training and not sd3.vae.training
    assert not any(m.training for m in sd3.text_encoders.modules())
    sd3.eval()


def test_offloaded_text_encoders_visit_the_device_only_while_encoding(monkeypatch):
    model = FlowModel.from_pipeline(build_pipeline(num_layers=1), max_sequence_length=1, offload_text_encoders=True)
    moves, move = [], model.text_encoders.to
    monkeypatch.setattr(model.text_encoders, "to", lambda device: moves.append(str(device)) or move(device))
    model.encode(PROMPTS)
    assert moves == [str(model.device), "cpu"]


def test_sd3_encode_shapes_and_dedup(sd3):
    cond = sd3.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    config = sd3.transformer.config
    tokens = sd3.pipe.tokenizer.model_max_length  # CLIP tokens, then the zero T5 padding
    assert cond.prompt_embeds.shape == (3, tokens + MAX_SEQUENCE_LENGTH, config.joint_attention_dim)
    assert cond.pooled.shape == (3, config.pooled_projection_dim) and len(cond) == 3
    assert torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[2])
    embeds, _, pooled, _ = sd3.pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH
    )
    torch.testing.assert_close(cond.prompt_embeds[:2], embeds)
    torch.testing.assert_close(cond.pooled[:2], pooled)
    assert len(sd3.negative(4)) == 4
    with pytest.raises(ValueError, match="non-empty list"):
        sd3.encode("a single string")


def test_prompt_embeds_index_cat_to():
    embeds = PromptEmbeds(torch.arange(6.0).view(3, 2, 1), torch.arange(3.0).view(3, 1))
    picked = embeds.index(torch.tensor([2, 0, 2]))
    assert picked.pooled.flatten().tolist() == [2.0, 0.0, 2.0]
    both = PromptEmbeds.cat([embeds, picked])
    assert len(both) == 6 and both.to(torch.float64).pooled.dtype == torch.float64
    with pytest.raises(ValueError, match="3 rows but pooled has 2"):
        PromptEmbeds(torch.zeros(3, 2, 1), torch.zeros(2, 1))


def test_sd3_sigmas_follow_the_scheduler(sd3):
    sigmas = sd3.sigmas(10)
    assert sigmas.shape == (11,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and (sigmas.diff() < 0).all()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(sd3.pipe.scheduler.config)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(sigmas, scheduler.sigmas.float())
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        sd3.sigmas(0)


def test_sd3_latents_and_noise(sd3):
    assert sd3.latent_shape(32) == (8, 8, 8) and sd3.latent_shape((32, 16)) == (8, 8, 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        sd3.latent_shape(36)
    seeds = [torch.Generator().manual_seed(s) for s in (3, 4)]
    noise = sd3.initial_noise(2, 32, seeds)
    assert noise.shape == (2, 8, 8, 8) and noise.dtype == torch.float32
    assert torch.equal(noise[1:], sd3.initial_noise(1, 32, torch.Generator().manual_seed(4)))


def test_sd3_sampling_matches_the_diffusers_pipeline(sd3):
    """Sigmas, timestep scale, CFG order and VAE scaling agree with StableDiffusion3Pipeline."""
    noise = sd3.initial_noise(2, 32, torch.Generator().manual_seed(0))
    ours = euler_sample(sd3, noise, PROMPTS, 3, 4.5, 32)
    theirs = sd3.pipe(
        PROMPTS, latents=noise, num_inference_steps=3, guidance_scale=4.5, output_type="pt",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    ).images
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def transformer_call(model, x, sigma, cond):
    with torch.no_grad():
        return model.transformer(
            hidden_states=x, timestep=torch.full((len(x),), sigma * 1000), encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled, return_dict=False,
        )[0]


def test_sd3_velocity_cfg_is_one_batched_call_of_the_two_branches(sd3):
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = sd3.encode(PROMPTS), sd3.negative(2)
    calls = []
    handle = sd3.transformer.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    with torch.no_grad():
        guided = sd3.velocity(x, 0.7, cond, 4.5)
        plain = sd3.velocity(x, torch.tensor([0.7, 0.7]), cond, 1.0)
    handle.remove()
    assert len(calls) == 2 and guided.dtype == torch.float32
    v_c, v_u = transformer_call(sd3, x, 0.7, cond), transformer_call(sd3, x, 0.7, uncond)
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    assert torch.equal(plain, v_c)
    with pytest.raises(ValueError, match=r"scalar or have shape \(2,\)"):
        sd3.velocity(x, torch.tensor([0.5]), cond)
    with pytest.raises(ValueError, match="2 latents but 1 conditioning rows"):
        sd3.velocity(x, 0.5, cond.index([0]))


def test_velocity_uses_the_given_transformer(sd3):
    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.inner(**kwargs)

    wrapper = Wrapper(sd3.transformer)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        out = sd3.velocity(x, 0.5, sd3.encode(PROMPTS[:1]), 3.0, transformer=wrapper)
    assert wrapper.calls == 1 and out.shape == x.shape


def test_sd3_decode_range_and_batching(sd3):
    latents = torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    images = sd3.decode(latents)
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(sd3.decode(latents, batch_size=2), images, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def saved_sd3(sd3, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3")
    sd3.pipe.save_pretrained(folder)
    return folder


def test_load_from_a_saved_folder(sd3, saved_sd3):
    loaded = load_flow_model(saved_sd3, max_sequence_length=MAX_SEQUENCE_LENGTH, decode_batch_size=2)
    assert isinstance(loaded, SD3Model) and loaded.pipe.text_encoder_3 is None
    assert loaded.decode_batch_size == 2 and loaded.max_sequence_length == MAX_SEQUENCE_LENGTH
    assert not any(p.requires_grad for p in loaded.parameters())
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        expected = sd3.velocity(x, 0.3, sd3.encode(PROMPTS), 4.5)
        assert torch.equal(loaded.velocity(x, 0.3, loaded.encode(PROMPTS), 4.5), expected)
    half = load_flow_model(saved_sd3, dtype=torch.bfloat16, max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert half.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.velocity(x, 0.3, half.encode(PROMPTS), 4.5).dtype == torch.float32


def write_index(folder, class_name):
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return folder


@pytest.mark.parametrize(
    "make_path, kwargs, message",
    [
        (lambda tmp: tmp / "missing" / "model", {}, r"model path .*missing/model does not exist"),
        (lambda tmp: "./not-here", {}, r"model path ./not-here does not exist"),
        (lambda tmp: tmp, {}, r"is not a diffusers pipeline folder \(no model_index.json\)"),
        (lambda tmp: write_index(tmp / "sd1", "StableDiffusionPipeline"), {},
         r"unsupported pipeline class 'StableDiffusionPipeline' in .*model_index.json; "
         r"supported: StableDiffusion3Pipeline, FluxPipeline, QwenImagePipeline, Flux2KleinPipeline, Flux2Pipeline, ZImagePipeline"),
        (lambda tmp: write_index(tmp / "sd3", "StableDiffusion3Pipeline"), {"family": "flux"},
         r"holds a StableDiffusion3Pipeline \(sd3\), but family='flux' was asked"),
        (lambda tmp: tmp, {"family": "sdxl"}, r"unknown model family 'sdxl'; use 'auto', 'flux', 'flux2', 'flux2-dev', 'qwenimage', 'sd3', 'zimage'"),
        (lambda tmp: "nobody-tpgrpo/no-such-model", {"local_files_only": True},
         r"could not download 'nobody-tpgrpo/no-such-model' from the Hugging Face hub .*check the id, your access "
         r".*your network or HF_HUB_OFFLINE, or pass a local folder"),
    ],
)
def test_load_errors_say_what_to_change(tmp_path, make_path, kwargs, message):
    with pytest.raises(ModelLoadError, match=message) as error:
        load_flow_model(make_path(tmp_path), **kwargs)
    assert isinstance(error.value, UserInputError) and "\n" not in str(error.value)


def test_load_rejects_a_file(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file; pass the pipeline folder"):
        load_flow_model(tmp_path / "weights.safetensors")


def test_from_pipeline_rejects_other_pipelines():
    with pytest.raises(ModelLoadError, match="unsupported pipeline class object"):
        FlowModel.from_pipeline(object())


# ------------------------------------------------------------------------------------ FLUX
@pytest.fixture(scope="module")
def flux():
    return FlowModel.from_pipeline(tiny_flux_pipeline(), max_sequence_length=6)


def test_flux_shapes(flux):
    assert isinstance(flux, FluxModel) and flux.family == "flux"
    cond = flux.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 6, 32) and cond.pooled.shape == (2, 32)
    assert flux.latent_shape(16) == (4, 8, 8)
    noise = flux.initial_noise(2, 16, torch.Generator().manual_seed(0))
    assert flux.velocity(noise, 0.5, cond, 3.5).shape == (2, 4, 8, 8)
    images = flux.decode(noise)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(ValueError, match="pass uncond=None"):
        flux.velocity(noise, 0.5, cond, 3.5, uncond=cond)


def test_flux_pack_round_trip(flux):
    x = torch.randn(3, 4, 8, 6)
    tokens = flux.pack(x)
    assert tokens.shape == (3, 12, 16)
    assert torch.equal(flux.unpack(tokens, 8, 6), x)


def test_flux_sigmas_depend_on_resolution(flux):
    small, large = flux.sigmas(6, 16), flux.sigmas(6, 64)
    for sigmas in (small, large):
        assert sigmas.shape == (7,) and sigmas[0] == 1.0 and sigmas[-1] == 0.0 and (sigmas.diff() < 0).all()
    assert (large[1:-1] > small[1:-1]).all()  # more image tokens, more shift
    with pytest.raises(ValueError, match="needs the resolution"):
        flux.sigmas(6)


def test_flux_sampling_matches_the_diffusers_pipeline(flux):
    """Sigmas with mu, timestep and guidance conventions, ids, packing and VAE scaling agree with FluxPipeline."""
    noise = flux.initial_noise(2, 16, torch.Generator().manual_seed(0))
    ours = euler_sample(flux, noise, PROMPTS, 3, 3.5, 16)
    theirs = flux.pipe(
        PROMPTS, latents=flux.pack(noise), height=16, width=16, num_inference_steps=3, guidance_scale=3.5,
        output_type="pt", max_sequence_length=6,
    ).images
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_flux_load_detects_the_family(flux, tmp_path):
    flux.pipe.save_pretrained(tmp_path)
    loaded = load_flow_model(tmp_path, max_sequence_length=6)
    assert isinstance(loaded, FluxModel)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = flux.velocity(x, 0.4, flux.encode(PROMPTS[:1]), 3.5)
        torch.testing.assert_close(loaded.velocity(x, 0.4, loaded.encode(PROMPTS[:1]), 3.5), expected)
