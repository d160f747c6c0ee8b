"""The training system end to end on a tiny random SD3 pipeline, through the real CLI."""
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from tpgrpo.algorithms import transition_pairs
from tpgrpo.cli import QUIET_WARNINGS, build_cli, main
from tpgrpo.families import FlowModel
from tpgrpo.lora import disabled_adapter, lora_parameters
from tpgrpo.maths import credit
from tpgrpo.tiny.components import load_pipeline
from tpgrpo.training.callbacks import AtomicCheckpoint, LoRAExport, ProgressBar, epoch_description
from tpgrpo.training.ema import LoRAEMA
from tpgrpo.training.evaluation import EvalResults


def cli_args(tmp_path, model_dir, prompts, *extra):
    """A short fit configuration: 2 prompts × 4 images, 3 steps, 2-step window."""
    return [
        "--config", "configs/tiny.yaml",
        f"--model.pretrained_path={model_dir}",
        "--model.sampling.num_steps=3",
        "--model.evaluation.num_steps=2",
        "--model.sampling.window_size=2",
        "--model.sampling.window_range=[0, 2]",
        "--model.lora.rank=4",
        "--model.lora.alpha=8",
        "--model.update.optimizer_steps_per_batch=2",
        "--images.every_n_train_steps=1",
        # random weights draw no shapes: a reward that varies on any image gives a learning signal
        "--model.rewards={jpeg_incompressibility: 1.0, shapes: 0.5}",
        f"--data.train_prompts={prompts}",
        f"--data.val_prompts={prompts}",
        "--data.prompts_per_step=2",
        "--data.group_size=4",
        "--data.eval_seeds=1",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        *extra,
    ]


def scalar_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return set(events.Tags()["scalars"]) | {f"image:{t}" for t in events.Tags()["images"]}


def test_fit_runs_end_to_end_and_logs(tmp_path, tiny_model_dir, prompt_file):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file)])
    messages = [str(w.message) for w in caught]
    # the frozen parts (and the transformer under manual optimisation) are in eval mode on purpose
    assert not [m for m in messages if "in eval mode at the start of training" in m or "LeafSpec" in m], messages
    assert cli.trainer.global_step == 2  # max_steps counts optimizer steps: one batch × 2 optimizer steps
    tags = scalar_tags(Path(cli.trainer.log_dir))
    for tag in [
        "train/reward_mean", "train/reward_std", "train/shapes", "train/jpeg_incompressibility", "train/policy_loss", "train/clip_frac",
        "train/ratio_mean", "train/grad_norm", "train/lr", "train/images_per_second", "per_step/R_0",
        "per_step/R_2", "per_step/turning_point_rate_0", "per_step/advantage_abs_mean_1",
        "train/turning_points_kept", "train/first_ratio_min", "train/first_ratio_max", "val/reward",
        "image:train/samples", "image:val/samples",
        *(f"time/{phase}_seconds" for phase in ("encode", "rollout", "decode", "reward", "credit", "update")),
    ]:
        assert tag in tags, tag
    checkpoint = torch.load(Path(cli.trainer.checkpoint_callback.last_model_path), weights_only=True, map_location="cpu")
    assert checkpoint["state_dict"], "LoRA weights missing from the checkpoint"
    assert all("lora" in key for key in checkpoint["state_dict"])


def test_only_lora_is_trained(tmp_path, tiny_model_dir, prompt_file):
    cli = build_cli(cli_args(tmp_path, tiny_model_dir, prompt_file), run=False)
    model = cli.model
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    after = model.transformer.state_dict()
    lora_keys = [k for k in before if "lora" in k]
    base_keys = [k for k in before if "lora" not in k]
    assert lora_keys and base_keys
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    assert any(not torch.equal(before[k], after[k]) for k in lora_keys if "lora_B" in k)
    # the frozen text encoders and VAE are untouched too
    assert not any(p.requires_grad for p in model.flow.vae.parameters())


def test_diffusion_nft_fits_through_the_cli_and_trains_only_the_lora(tmp_path, tiny_model_dir, prompt_file):
    cli = build_cli(cli_args(tmp_path, tiny_model_dir, prompt_file, "--model.algorithm=diffusion-nft"), run=False)
    model = cli.model
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    cli.trainer.fit(model, datamodule=cli.datamodule)
    after = model.transformer.state_dict()
    assert cli.trainer.global_step == 2
    assert all(torch.equal(before[k], after[k]) for k in before if "lora" not in k)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    tags = scalar_tags(Path(cli.trainer.log_dir))
    for tag in ["train/policy_loss", "train/old_deviation", "train/grad_norm", "train/nfe_per_image", "val/reward",
                "per_step/advantage_abs_mean_2", "time/rollout_seconds"]:
        assert tag in tags, tag
    assert not any(tag.startswith(("per_step/R_", "train/turning_points", "train/ratio")) for tag in tags)


def test_reference_is_the_base_model(tmp_path, tiny_model_dir, prompt_file):
    cli = build_cli(cli_args(tmp_path, tiny_model_dir, prompt_file), run=False)
    model = cli.model
    with torch.no_grad():
        for p in model.transformer.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    base = FlowModel.from_pipeline(load_pipeline(tiny_model_dir))
    cond = base.encode(["a photo of a circle", "a photo of a square"])
    latents = torch.randn(2, *base.latent_shape(32), generator=torch.Generator().manual_seed(0))
    expected = base.velocity(latents, 0.5, cond, guidance_scale=1.0)
    with torch.no_grad():
        adapted = model.flow.velocity(latents, 0.5, cond, guidance_scale=1.0, transformer=model.transformer)
        with disabled_adapter(model.transformer):
            reference = model.flow.velocity(latents, 0.5, cond, guidance_scale=1.0, transformer=model.transformer)
    torch.testing.assert_close(reference, expected)
    assert not torch.allclose(adapted, expected)


def _collected(tmp_path, model_dir, prompts, *extra):
    cli = build_cli(cli_args(tmp_path, model_dir, prompts, "--model.update.kl_beta=0", *extra), run=False)
    datamodule = cli.datamodule
    datamodule.trainer = cli.trainer
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return cli.model, batch, cli.model.collect(batch, step=0)


def test_first_ratio_is_one(tmp_path, tiny_model_dir, prompt_file):
    model, batch, collected = _collected(tmp_path, tiny_model_dir, prompt_file)
    rows = torch.arange(len(collected))
    for index in model.algorithm.trained_units(collected):
        _, metrics = model.algorithm.loss(collected, *transition_pairs(rows, [index]))
        assert abs(float(metrics["ratio_mean"]) - 1.0) < 1e-4
        assert float(metrics["clip_frac"]) == 0.0


@pytest.mark.parametrize("limit", [None, 4])
def test_bf16_weights_keep_the_first_ratio_at_one(tmp_path, tiny_model_dir, prompt_file, limit):
    """Frozen parts in bfloat16, LoRA and log-probs in float32: the update recomputes the rollout's
    transitions with ratio 1 to within the paper's clip range (1e-5), in one call per micro-batch
    or in calls of a few latents."""
    extra = ["--model.weights_dtype=bfloat16", "--model.update.clip_range=1e-5"]
    model, batch, collected = _collected(tmp_path, tiny_model_dir, prompt_file, *extra)
    assert model.flow.dtype == torch.bfloat16 and model.flow.vae.dtype == torch.bfloat16
    assert all(encoder.dtype == torch.bfloat16 for encoder in model.flow.text_encoders)
    assert {p.dtype for p in lora_parameters(model.transformer)} == {torch.float32}
    assert collected.rollout.log_probs.dtype == torch.float32
    model.algorithm.update = dataclasses.replace(model.algorithm.update, max_latents_per_call=limit)
    calls = [call for plan in model.algorithm.plan(collected, 1) for call in plan.calls]
    assert sum(call.rows.numel() for call in calls) == len(collected) * collected.rollout.window_size
    for call in calls:
        _, metrics = model.algorithm.loss(collected, call.rows, call.units)
        assert float(metrics["ratio_max"]) - 1 <= 1e-5 and 1 - float(metrics["ratio_min"]) <= 1e-5
        assert float(metrics["clip_frac"]) == 0.0


def test_outcome_credit_gives_flow_grpo_loss(tmp_path, tiny_model_dir, prompt_file):
    model, batch, collected = _collected(tmp_path, tiny_model_dir, prompt_file, "--model.algorithm=flow-grpo")
    result = collected.rollout
    assert result.final_latents.shape[1] == 1  # no branches for Flow-GRPO
    final = collected.final_rewards
    expected_advantages = credit.group_advantages(
        final, batch["group_ids"], clip=model.credit.advantage_clip
    )[:, None].expand(-1, result.window_size)
    torch.testing.assert_close(collected.advantages, expected_advantages)
    rows = torch.arange(len(final))
    loss, metrics = model.algorithm.loss(collected, *transition_pairs(rows, [0]))
    # with ratio 1 the Flow-GRPO loss is -mean(A)
    assert float(loss.detach()) == pytest.approx(float(-expected_advantages[:, 0].mean()), abs=1e-4)


def test_tp_credit_uses_turning_point_rewards(tmp_path, tiny_model_dir, prompt_file):
    model, batch, collected = _collected(tmp_path, tiny_model_dir, prompt_file)
    sequence = collected.rewards
    assert sequence.shape == (8, 3)  # W + 1 rewards per image
    torch.testing.assert_close(collected.step_rewards, credit.turning_point_rewards(sequence))


def run_main(capsys, args):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "override, message",
    [
        ("--data.train_prompts=missing.jsonl", "missing.jsonl"),
        ("--model.sampling.window_size=5", "window_size"),
        ("--model.rewards={nope: 1.0}", "unknown reward 'nope'"),
        ("--data.group_size=1", "group_size"),
        ("--model.sampling.noise_level=3", "noise_level"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, tiny_model_dir, prompt_file, capsys, override, message):
    err = run_main(capsys, ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), override])
    assert message in err


def test_empty_prompt_file(tmp_path, tiny_model_dir, prompt_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    err = run_main(capsys, ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), f"--data.train_prompts={empty}"])
    assert "empty" in err.lower()


def test_config_typo_is_rejected(tmp_path, tiny_model_dir, prompt_file, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), "--model.noise_levle=0.5"])
    assert stop.value.code != 0
    assert "noise_levle" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted(str(p) for p in Path("configs").glob("*.yaml") if p.name != "base.yaml"))
def test_shipped_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", config, "--print_config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    for key in ["num_steps", "window_size", "noise_level", "guidance_scale", "clip_range", "kl_beta", "eta", "rank", "group_size"]:
        assert f"{key}:" in printed


def test_test_and_predict_subcommands(tmp_path, tiny_model_dir, prompt_file):
    args = cli_args(tmp_path, tiny_model_dir, prompt_file)
    results = EvalResults()
    tested = build_cli([*args, f"--data.test_prompts={prompt_file}", "--data.eval_seeds=2"], run=False)
    tested.trainer.callbacks.append(results)
    tested.trainer.test(tested.model, datamodule=tested.datamodule)
    result = results.latest("test")
    assert result.scores["reward"].shape == (8,)  # 4 prompts × 2 fixed seeds
    prompts = {json.loads(line)["prompt"] for line in Path(prompt_file).read_text().splitlines()}
    assert len(result.prompts) == 8 and set(result.prompts) == prompts
    out = tmp_path / "predicted"
    build_cli(["predict", *args, f"--data.predict_prompts={prompt_file}", f"--model.evaluation.predict_dir={out}"])
    written = sorted(p.name for p in out.glob("*.png"))
    assert len(written) == 4 and written[0].endswith("_seed0.png")


def test_evaluation_rewards_are_scored_and_logged_beside_the_training_reward(tmp_path, tiny_model_dir, prompt_file):
    from tpgrpo.training.evaluation import mean_and_stderr

    # jpeg_incompressibility (training, kB) also appears among the evaluation rewards: it is left out
    watched = "--model.eval_rewards={jpeg_compressibility: {}, jpeg_incompressibility: {quality: 50}}"
    args = [*cli_args(tmp_path, tiny_model_dir, prompt_file), watched, f"--data.test_prompts={prompt_file}"]
    results = EvalResults()
    tested = build_cli([*args, "--data.eval_seeds=2"], run=False)
    assert tested.model.eval_reward_options == {"jpeg_compressibility": {}}
    assert tested.model.hparams["eval_rewards"] == {"jpeg_compressibility": {}}
    tested.trainer.callbacks.append(results)
    tested.trainer.test(tested.model, datamodule=tested.datamodule)
    scores = results.latest("test").scores
    # the same images, scored by both: Flow-GRPO's compressibility is -kB / 500 at the same JPEG quality
    torch.testing.assert_close(scores["jpeg_compressibility"], -scores["jpeg_incompressibility"] / 500)
    mean, stderr = mean_and_stderr(scores["jpeg_compressibility"])
    logged = tested.trainer.callback_metrics
    assert float(logged["test/jpeg_compressibility"]) == pytest.approx(mean, rel=1e-5)
    assert float(logged["test/jpeg_compressibility_stderr"]) == pytest.approx(stderr, rel=1e-5) and stderr > 0
    assert "test/reward_stderr" in logged
    assert float(logged["test/reward"]) == pytest.approx(float(scores["reward"].mean()), rel=1e-5)


def test_an_unknown_evaluation_reward_is_one_line(tmp_path, tiny_model_dir, prompt_file, capsys):
    err = run_main(capsys, ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), "--model.eval_rewards={aesthetik: {}}"])
    assert "eval_rewards.aesthetik: unknown reward; available:" in err


# ------------------------------------------------------------------------------- base callbacks
def demo_trainer(tmp_path, model_dir, *extra):
    """The trainer of `make demo`'s config (configs/tiny.yaml) on the small random model, with the base
    EMA put back (the demo turns it off, see tiny.yaml) so that every base callback is there."""
    args = ["--config", "configs/tiny.yaml", f"--model.pretrained_path={model_dir}", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}", "--ema={class_path: tpgrpo.training.ema.LoRAEMA}", *extra]
    return build_cli(args, run=False).trainer


def of_type(trainer, cls):
    found = [c for c in trainer.callbacks if type(c) is cls]
    assert len(found) == 1, [type(c).__name__ for c in trainer.callbacks]
    return found[0]


def test_the_demo_config_has_every_base_callback_with_its_tuning(tmp_path, tiny_model_dir):
    from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor

    trainer = demo_trainer(tmp_path, tiny_model_dir, "--trainer.callbacks+={class_path: lightning.pytorch.callbacks.DeviceStatsMonitor}")
    ema = of_type(trainer, LoRAEMA)
    assert (ema.decay, ema.every) == (0.9, 8)  # base.yaml
    checkpoint = of_type(trainer, AtomicCheckpoint)
    assert trainer.checkpoint_callbacks == [checkpoint]
    assert (checkpoint._every_n_train_steps, checkpoint.save_last, checkpoint.save_top_k) == (40, True, 0)  # tiny.yaml: 40
    assert of_type(trainer, LoRAExport).every_n_train_steps == 0
    assert of_type(trainer, LearningRateMonitor).logging_interval == "step"
    assert trainer.progress_bar_callback is of_type(trainer, ProgressBar)
    of_type(trainer, DeviceStatsMonitor)  # trainer.callbacks adds to the base callbacks


def test_base_callbacks_are_tuned_by_key_and_removed_by_null_or_the_trainer_flags(tmp_path, tiny_model_dir):
    from lightning.pytorch.callbacks import LearningRateMonitor

    trainer = demo_trainer(tmp_path, tiny_model_dir, "--ema.decay=0.5", "--checkpoint.every_n_train_steps=3",
                           "--export.every_n_train_steps=7")
    assert of_type(trainer, LoRAEMA).decay == 0.5 and trainer.checkpoint_callback._every_n_train_steps == 3
    assert of_type(trainer, LoRAExport).every_n_train_steps == 7
    trainer = demo_trainer(tmp_path, tiny_model_dir, "--trainer.enable_checkpointing=false", "--trainer.logger=false",
                           "--trainer.enable_progress_bar=false")
    kinds = {type(c) for c in trainer.callbacks}
    assert {LoRAEMA, LoRAExport} <= kinds and not kinds & {AtomicCheckpoint, LearningRateMonitor, ProgressBar}
    assert trainer.checkpoint_callback is None and trainer.progress_bar_callback is None
    trainer = demo_trainer(tmp_path, tiny_model_dir, "--ema=null", "--export=null")
    kinds = {type(c) for c in trainer.callbacks}
    assert not kinds & {LoRAEMA, LoRAExport} and {AtomicCheckpoint, LearningRateMonitor, ProgressBar} <= kinds
    # one of the same kind in trainer.callbacks replaces the base one
    trainer = demo_trainer(tmp_path, tiny_model_dir, "--trainer.callbacks+={class_path: tpgrpo.training.ema.LoRAEMA, init_args: {decay: 0.25}}")
    assert of_type(trainer, LoRAEMA).decay == 0.25


@pytest.mark.parametrize("epoch, max_epochs, expected", [(1, -1, "Epoch 1"), (0, None, "Epoch 0"), (2, 10, "Epoch 2/9"), (0, 1, "Epoch 0/0")])
def test_epoch_description(epoch, max_epochs, expected):
    assert epoch_description(epoch, max_epochs) == expected


def test_the_progress_bar_of_a_step_bounded_run_shows_no_epoch_total(tmp_path, tiny_model_dir):
    trainer = demo_trainer(tmp_path, tiny_model_dir)
    assert trainer.max_steps == 100
    trainer.fit_loop.max_epochs = -1  # what `fit` sets when max_steps bounds the run
    bar = trainer.progress_bar_callback
    bar._trainer = trainer  # as `setup` attaches it
    if hasattr(bar, "_get_train_description"):  # the rich bar (Lightning's: "Epoch 1/-2")
        assert bar._get_train_description(1).strip() == "Epoch 1"
        trainer.fit_loop.max_epochs = 10
        assert bar._get_train_description(1).strip() == "Epoch 1/9"


def test_the_quieted_warnings_are_exactly_the_known_ones():
    import re

    eval_mode, pytree = QUIET_WARNINGS
    assert re.match(eval_mode, "Found 460 module(s) in eval mode at the start of training. This may lead to ...")
    assert re.match(pytree, "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`")
    for other in ("Found 3 module(s) in train mode", "The dataloader does not have many workers", "eval mode"):
        assert not any(re.match(pattern, other) for pattern in QUIET_WARNINGS), other
