"""The model families behind `FlowModel` beyond SD3 and FLUX.1 (Qwen-Image, FLUX.2 [klein] and [dev], Z-Image),
each on a tiny random pipeline of its real diffusers and transformers classes, built offline:
sampling equals the family's own diffusers pipeline, a prompt's velocity does not depend on
its batch, the rollout engine equals the sequential reference, LoRA and FSDP2 find the blocks,
the embedding cache keeps masks, a saved folder is recognised, and a 2-step ``fit`` through
the CLI trains only the LoRA, whose export loads with the family's own ``load_lora_weights``."""
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from tests.helpers.sampling import euler_sample
from tests.helpers.tiny_models import (
    SEQUENCE_LENGTHS,
    STAND_INS,
    processor_wrapped,
    tiny_flux2_dev_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux_pipeline,
    tiny_qwenimage_pipeline,
    tiny_zimage_pipeline,
)
from tpgrpo.distributed import Collectives, is_sharded, transformer_blocks
from tpgrpo.errors import UserInputError
from tpgrpo.families import (
    PIPELINE_FAMILIES,
    FlowModel,
    Flux2DevModel,
    Flux2Model,
    FluxModel,
    ModelLoadError,
    QwenImageModel,
    ZImageModel,
    load_flow_model,
    pack_2x2,
)
from tpgrpo.lora import DEFAULT_TARGET_MODULES, add_lora, disabled_adapter, full_tensor
from tpgrpo.maths.rollout import rollout, rollout_sequential
from tpgrpo.maths.sde import step_kind
from tpgrpo.memory import is_lora_target
from tpgrpo.training.embedding_cache import EmbeddingCache, model_fingerprint

PROMPTS = ["a photo of two red circles", "a blue square"]
RESOLUTION = 32


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable
    model_class: type
    max_sequence_length: int
    blocks: int  # repeated blocks of the tiny transformer

    def pipeline_kwargs(self, noise: torch.Tensor, guidance: float) -> dict:
        """The family pipeline's arguments for our latents and our guidance convention."""
        if self.name == "qwenimage":  # packed latents; "true CFG" needs a negative prompt
            extra = {"negative_prompt": " ", "true_cfg_scale": guidance} if guidance > 1 else {}
            return {"latents": pack_2x2(noise), **extra}
        if self.name == "zimage":  # its guidance_scale g: v = pos + g (pos - neg), ours minus one
            return {"latents": noise, "guidance_scale": guidance - 1}
        return {"latents": noise, "guidance_scale": guidance}  # FLUX.2: CFG (klein), guidance embedding (dev)


FAMILIES = [
    Family("qwenimage", tiny_qwenimage_pipeline, QwenImageModel, SEQUENCE_LENGTHS["qwenimage"], blocks=1),
    Family("flux2", tiny_flux2_klein_pipeline, Flux2Model, SEQUENCE_LENGTHS["flux2"], blocks=2),
    Family("flux2-dev", tiny_flux2_dev_pipeline, Flux2DevModel, SEQUENCE_LENGTHS["flux2-dev"], blocks=2),
    Family("zimage", tiny_zimage_pipeline, ZImageModel, SEQUENCE_LENGTHS["zimage"], blocks=3),
]
BY_NAME = {family.name: family for family in FAMILIES}
ids = [family.name for family in FAMILIES]


@pytest.fixture(scope="module", params=FAMILIES, ids=ids)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model(family):
    return FlowModel.from_pipeline(family.build(), max_sequence_length=family.max_sequence_length)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_equals_the_familys_diffusers_pipeline(family, model, guidance):
    """Sigmas (with the family's shift), timestep and sign conventions, packing, position ids,
    masks, guidance and VAE decoding together, against the pipeline's own loop."""
    noise = model.initial_noise(2, RESOLUTION, torch.Generator().manual_seed(0))
    ours = euler_sample(model, noise, PROMPTS, 3, guidance, RESOLUTION)
    theirs = model.pipe(
        prompt=PROMPTS, height=RESOLUTION, width=RESOLUTION, num_inference_steps=3, output_type="pt",
        max_sequence_length=family.max_sequence_length, **family.pipeline_kwargs(noise, guidance),
    ).images
    assert ours.shape == (2, 3, RESOLUTION, RESOLUTION) and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_family_is_recognised_and_shapes_are_consistent(family, model):
    assert isinstance(model, family.model_class) and model.family == family.name
    assert PIPELINE_FAMILIES[type(model.pipe).__name__] is family.model_class
    channels, h, w = model.latent_shape(RESOLUTION)
    noise = model.initial_noise(3, RESOLUTION, torch.Generator().manual_seed(1))
    assert noise.shape == (3, channels, h, w)
    velocity = model.velocity(noise, torch.tensor([0.9, 0.5, 0.1]), model.encode([PROMPTS[0]] * 3), 4.0)
    assert velocity.shape == noise.shape and velocity.dtype == torch.float32 and velocity.isfinite().all()
    assert model.decode(noise).shape == (3, 3, RESOLUTION, RESOLUTION)
    with pytest.raises(UserInputError, match="must be a positive multiple of"):
        model.latent_shape(RESOLUTION + 2)
    sigmas = model.sigmas(6, RESOLUTION)
    assert sigmas.shape == (7,) and sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()


def test_the_schedule_shifts_with_the_image_size_where_the_family_does(family, model):
    small, large = model.sigmas(6, RESOLUTION), model.sigmas(6, 4 * RESOLUTION)
    if family.name == "zimage":  # a static shift
        assert torch.equal(small, large)
    else:  # more image tokens, more shift (Qwen-Image's last sigma before 0 is its terminal 0.02 at any size)
        assert (large[1:-2] > small[1:-2]).all()
    if family.name.startswith("flux2"):  # FLUX.2's shift depends on the number of steps too
        shifted = model.sigmas(12, RESOLUTION)
        assert not torch.allclose(shifted[::2], small)


def test_a_prompts_velocity_does_not_depend_on_its_batch(model):
    """Prompts of different lengths are padded and masked (Qwen-Image, Z-Image) or padded to a
    fixed length (FLUX.2): an image's velocity is the same alone or next to a longer prompt."""
    both = model.encode(["a cat", "a very long prompt about a small red cube on a large wooden table"])
    alone = model.encode(["a cat"])
    if both.mask is not None:
        lengths = both.mask.sum(dim=1)
        assert lengths[0] < lengths[1] == both.prompt_embeds.shape[1]  # trimmed to the longest
        assert alone.prompt_embeds.shape[1] == lengths[0]
    x = model.initial_noise(1, RESOLUTION, torch.Generator().manual_seed(2))
    with torch.no_grad():
        in_batch = model.velocity(torch.cat([x, x]), 0.7, both, 4.0)[:1]
        torch.testing.assert_close(in_batch, model.velocity(x, 0.7, alone, 4.0), atol=1e-5, rtol=1e-5)


def test_a_prompt_longer_than_max_sequence_length_warns_once(family, model):
    import warnings

    from tpgrpo.prompt_length import PromptLengthCheck

    check = PromptLengthCheck(model.pipe, model.max_sequence_length, model.sequence_tokenizers)
    long = "a photo of " + "red circles and " * family.max_sequence_length
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for prompts in ([PROMPTS[0]], [long], [long + " more"]):
            with check(prompts):
                model.encode(prompts)
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and f"reads at most {family.max_sequence_length}" in messages[0], messages
    assert "raise model.max_sequence_length" in messages[0]


def test_the_rollout_engine_equals_the_sequential_reference(model):
    cond = model.encode(PROMPTS)

    def velocity_fn(latents, sigma, rows):
        with torch.no_grad():
            return model.velocity(latents, sigma, cond.index(rows), 4.0)

    start = model.initial_noise(2, RESOLUTION, torch.Generator().manual_seed(3))
    args = (velocity_fn, start, model.sigmas(4, RESOLUTION), 0, 3, step_kind("cps", 0.7))
    reference = rollout_sequential(*args, generator=torch.Generator().manual_seed(4))
    engine = rollout(*args, generator=torch.Generator().manual_seed(4), max_batch=5)
    assert engine.nfe_per_image < reference.nfe_per_image
    for name in ("states", "log_probs", "final_latents"):
        torch.testing.assert_close(getattr(engine, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_lora_adapts_every_block_and_fsdp2_shards_each(family):
    transformer = family.build().transformer
    blocks = transformer_blocks(transformer)
    assert len(blocks) == family.blocks
    add_lora(transformer, rank=2, alpha=4, family=family.name)
    targets = DEFAULT_TARGET_MODULES[family.name]
    for block in blocks:
        adapted = [name for name, _ in block.named_parameters() if "lora_A" in name]
        assert adapted and all(is_lora_target(name.split(".lora_A")[0], targets) for name in adapted)
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_the_embedding_cache_keeps_masks(model, tmp_path):
    prompts = ["", "a cat", "a photo of two red circles"]
    cache = EmbeddingCache(tmp_path, "key", prompts)
    cache.build(model, Collectives())
    cache.open()
    expected = model.encode_uncached(prompts[1:])
    got = cache.lookup(prompts[1:])
    assert got.tensors().keys() == expected.tensors().keys()
    for name, value in expected.tensors().items():
        torch.testing.assert_close(got.tensors()[name], value, atol=1e-6, rtol=1e-5)
    cache.check(model, prompts[1:])


def test_a_saved_folder_is_recognised(family, model, tmp_path):
    model.pipe.save_pretrained(tmp_path)
    loaded = load_flow_model(tmp_path, max_sequence_length=family.max_sequence_length)
    assert type(loaded) is family.model_class
    x = model.initial_noise(1, RESOLUTION, torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model.velocity(x, 0.4, model.encode(PROMPTS[:1]), 4.0)
        torch.testing.assert_close(loaded.velocity(x, 0.4, loaded.encode(PROMPTS[:1]), 4.0), expected)
    other = "sd3"
    with pytest.raises(ModelLoadError, match=f"but family='{other}' was asked"):
        load_flow_model(tmp_path, family=other)


def test_a_step_distilled_flux2_refuses_guidance():
    pipe = tiny_flux2_klein_pipeline(is_distilled=True)
    model = FlowModel.from_pipeline(pipe, max_sequence_length=SEQUENCE_LENGTHS["flux2"])
    x = model.initial_noise(1, RESOLUTION)
    cond = model.encode(PROMPTS[:1])
    assert model.velocity(x, 0.5, cond, 1.0).shape == x.shape
    with pytest.raises(UserInputError, match="step-distilled and takes no guidance; use 1"):
        model.velocity(x, 0.5, cond, 4.0)


# ------------------------------------------------------------------- training through the CLI
SHORT = ["--model.sampling.num_steps=3", "--model.sampling.window_size=2", "--model.sampling.window_range=[0, 2]",
         "--data.prompts_per_step=1", "--data.group_size=2", "--data.val_prompts=null", "--trainer.max_steps=2",
         "--trainer.enable_progress_bar=false", "--images.every_n_train_steps=0",
         "--model.rewards={jpeg_incompressibility: 1.0}", f"--model.sampling.resolution={RESOLUTION}",
         "--model.update.train_micro_batch=2", "--model.update.max_latents_per_call=2",
         "--model.sampling.rollout_max_batch=8", "--model.lora.rank=2", "--model.lora.alpha=4",
         # float32 on one CPU process, so the exported LoRA can be compared exactly
         "--model.weights_dtype=float32", "--trainer.precision=32-true", "--trainer.accelerator=cpu"]
# FLUX.1 too: its config adapts the feed-forward layers as well, which its pipeline's loader must read
FIT_FAMILIES = {**BY_NAME, "flux": Family("flux", tiny_flux_pipeline, FluxModel, SEQUENCE_LENGTHS["flux"], blocks=2)}


def test_every_registered_family_has_a_tiny_stand_in_here():
    """Adding a family to tpgrpo.families means adding its stand-in to these tests (SD3's is the shipped model's kind)."""
    assert set(FIT_FAMILIES) | {"sd3"} == {cls.family for cls in PIPELINE_FAMILIES.values()} == set(STAND_INS) | {"sd3"}
    for family in FIT_FAMILIES.values():
        assert PIPELINE_FAMILIES[type(family.build()).__name__] is family.model_class


@pytest.mark.e2e
@pytest.mark.parametrize("name, strategy",
                         [("qwenimage", "fsdp2"), ("flux2", "auto"), ("flux2-dev", "fsdp2"), ("zimage", "fsdp2"),
                          ("flux", "auto")])
def test_fit_trains_only_lora_and_the_export_loads_with_the_pipelines_own_loader(tmp_path, name, strategy):
    """One CPU process; ``fsdp2`` (qwenimage.yaml's strategy) shards the family's blocks over a world of one."""
    from diffusers import DiffusionPipeline

    from tpgrpo import export
    from tpgrpo.cli import build_cli

    family = FIT_FAMILIES[name]
    folder = tmp_path / "model"
    family.build().save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a dog\na red cat on a bench\n")
    args = ["--config", STAND_INS[name][0], f"--model.pretrained_path={folder}",
            f"--model.max_sequence_length={family.max_sequence_length}", f"--data.train_prompts={prompts}",
            "--data.test_prompts=null", *SHORT, f"--model.prompt_cache.folder={tmp_path / 'embeddings'}",
            f"--trainer.strategy={strategy}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    cli = build_cli(args, run=False)
    module = cli.model
    assert module.flow.family == name
    assert module.prompt_cache.enabled  # the config's: the (masked) embeddings come from the cache
    before = {key: value.clone() for key, value in module.transformer.state_dict().items()}
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2 and module.flow.embedding_cache is not None
    assert is_sharded(module.transformer) == (strategy == "fsdp2")
    after = {key: full_tensor(value) for key, value in module.transformer.state_dict().items()}
    assert all(torch.equal(before[key], after[key]) for key in before if "lora_" not in key)
    assert any(not torch.equal(before[key], after[key]) for key in before if "lora_B" in key)

    out = tmp_path / "lora"
    export.main(["--ckpt", cli.trainer.checkpoint_callback.last_model_path, "--no-ema", "--out", str(out)])
    pipe = DiffusionPipeline.from_pretrained(folder)
    fresh = FlowModel.from_pipeline(pipe, max_sequence_length=family.max_sequence_length)
    x = fresh.initial_noise(1, RESOLUTION, torch.Generator().manual_seed(6))
    with torch.no_grad():
        cond = fresh.encode(PROMPTS[:1])
        base = fresh.velocity(x, 0.6, cond, 1.0)
        pipe.load_lora_weights(out)
        adapted = fresh.velocity(x, 0.6, cond, 1.0)
        trained = module.flow.velocity(x, 0.6, cond, 1.0, transformer=module.transformer)
        with disabled_adapter(module.transformer):
            reference = module.flow.velocity(x, 0.6, cond, 1.0, transformer=module.transformer)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(adapted, trained, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference, base, atol=1e-5, rtol=1e-5)


def test_flux2_dev_guides_through_its_embedding_and_refuses_an_unconditional_branch():
    model = FlowModel.from_pipeline(tiny_flux2_dev_pipeline(), max_sequence_length=SEQUENCE_LENGTHS["flux2-dev"])
    x = model.initial_noise(1, RESOLUTION, torch.Generator().manual_seed(7))
    cond = model.encode(PROMPTS[:1])
    with torch.no_grad():
        weak, strong = (model.velocity(x, 0.5, cond, scale) for scale in (1.0, 4.0))
    assert not torch.allclose(weak, strong)
    with pytest.raises(ValueError, match="guidance embedding, not classifier-free guidance"):
        model.velocity(x, 0.5, cond, 4.0, uncond=model.negative(1))


def test_flux2_dev_reads_prompts_through_a_processor_as_the_hub_pipeline_holds_its_tokenizer():
    """The hub's FLUX.2 [dev] tokenizer is a PixtralProcessor: encoding, the prompt-length check and
    the embedding cache's fingerprint read the tokenizer inside it."""
    import warnings

    from tpgrpo.prompt_length import PromptLengthCheck

    length = SEQUENCE_LENGTHS["flux2-dev"]
    plain = FlowModel.from_pipeline(tiny_flux2_dev_pipeline(), max_sequence_length=length)
    pipe = tiny_flux2_dev_pipeline()
    pipe.tokenizer = processor_wrapped(pipe.tokenizer)
    wrapped = FlowModel.from_pipeline(pipe, max_sequence_length=length)
    torch.testing.assert_close(wrapped.encode(PROMPTS).prompt_embeds, plain.encode(PROMPTS).prompt_embeds)
    fingerprints = [model_fingerprint(model, "path")["tokenizers"]["tokenizer"] for model in (wrapped, plain)]
    assert fingerprints[0][0] == "CLIPProcessor" and fingerprints[0][1:] == fingerprints[1][1:]
    assert model_fingerprint(wrapped, "path")["system_message"] == pipe.system_message
    check = PromptLengthCheck(pipe, length, wrapped.sequence_tokenizers)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check.check(["a photo of " + "red circles and " * length])
    assert any(f"reads at most {length}" in str(w.message) for w in caught)
