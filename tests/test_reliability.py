"""Reliability: exact resume, atomic checkpoints, LoRA export, input guards, determinism, failing rewards.

The training runs use the tiny random SD3 pipeline on the CPU: 1 prompt × 3 images per batch, a
2-prompt file (2 batches per epoch), 2 optimizer steps per batch. The reference run (6 optimizer
steps = 3 batches, crossing an epoch) is shared by several tests.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file
from test_train import cli_args
from torch.utils.data import DataLoader

from tpgrpo.cli import build_cli, main
from tpgrpo.errors import UserInputError
from tpgrpo.lora import lora_state_dict
from tpgrpo.training.callbacks import AtomicCheckpoint, LoRAExport
from tpgrpo.training.ema import LoRAEMA

ROOT = Path(__file__).resolve().parent.parent
TIMING_TAGS = ("train/images_per_second", "time/")  # wall-clock measurements (prefixes): differ between runs
RECORDS = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"},
    {"tag": "colors", "include": [{"class": "triangle", "count": 1, "color": "red"}], "prompt": "a photo of a red triangle"},
]


def callbacks_args(every: int = 1) -> tuple[str, ...]:
    """The base callbacks tuned: EMA every 2 optimizer steps, atomic checkpoints every ``every`` steps (LoRA export as is)."""
    return ("--ema.decay=0.5", "--ema.every=2", f"--checkpoint.every_n_train_steps={every}")


SMALL = (
    "--data.prompts_per_step=1", "--data.group_size=3", "--model.update.optimizer_steps_per_batch=2",
    "--model.optimizer.learning_rate=1e-3", "--images.every_n_train_steps=0", *callbacks_args(),
)


def fit_args(root: Path, model_dir, prompts, *extra) -> list[str]:
    return ["fit", *cli_args(root, model_dir, prompts, *SMALL, *extra)]


def version_scalars(version: Path, out: dict | None = None) -> dict[str, dict[int, float]]:
    """The scalars of one logger version folder: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {} if out is None else out
    events = EventAccumulator(str(version))
    events.Reload()
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            out.setdefault(tag, {})[event.step] = event.value
    return out


def scalars(log_root: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every version under ``log_root`` (later versions win)."""
    out: dict[str, dict[int, float]] = {}
    for version in sorted(log_root.glob("*/version_*"), key=lambda p: int(p.name.split("_")[1])):
        version_scalars(version, out)
    return out


def assert_same_metrics(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for tag in (t for t in a if not t.startswith(TIMING_TAGS)):
        assert a[tag].keys() == b[tag].keys(), tag
        for step, x in a[tag].items():
            y = b[tag][step]
            assert (math.isnan(x) and math.isnan(y)) or x == y, (tag, step, x, y)


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def ema_of(trainer) -> LoRAEMA:
    return next(c for c in trainer.callbacks if isinstance(c, LoRAEMA))


@pytest.fixture(scope="module")
def prompts2(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "two.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, prompts2):
    """An uninterrupted run of 6 optimizer steps (3 batches over 2 epochs) with a checkpoint every batch."""
    root = tmp_path_factory.mktemp("reference")
    cli = build_cli(fit_args(root, tiny_model_dir, prompts2, "--trainer.max_steps=6"))
    assert cli.trainer.global_step == 6
    return cli, root


# ------------------------------------------------------------------------------------- resume
def test_stopped_and_resumed_run_equals_uninterrupted_run(reference, tmp_path, tiny_model_dir, prompts2):
    """Stop after 2 optimizer steps (mid-epoch), then `fit --ckpt_path last` to 6: same metrics, weights, EMA, Adam."""
    full, full_root = reference
    build_cli(fit_args(tmp_path, tiny_model_dir, prompts2, "--trainer.max_steps=2"))
    resumed = build_cli(fit_args(tmp_path, tiny_model_dir, prompts2, "--trainer.max_steps=6", "--ckpt_path=last"))
    # `last` is found in the first run's logger version, although the resumed run logs to a new one
    assert resumed.trainer.ckpt_path == str(tmp_path / "logs" / "tpgrpo" / "version_0" / "checkpoints" / "last.ckpt")
    assert Path(resumed.trainer.log_dir).name == "version_1"
    assert resumed.trainer.global_step == 6

    metrics_full, metrics_resumed = scalars(full_root / "logs"), scalars(tmp_path / "logs")
    assert len(metrics_full["train/reward_mean"]) == len(metrics_full["train/policy_loss"]) == 3
    second_half = version_scalars(tmp_path / "logs" / "tpgrpo" / "version_1")
    assert sorted(second_half["train/reward_mean"]) == [1, 2]  # the resumed run did not redo the first batch
    assert_same_metrics(metrics_full, metrics_resumed)
    assert_same_tensors(lora_state_dict(full.model.transformer), lora_state_dict(resumed.model.transformer))
    full_ema, resumed_ema = ema_of(full.trainer).shadow, ema_of(resumed.trainer).shadow
    assert full_ema.keys() == resumed_ema.keys() and all(torch.equal(full_ema[k], resumed_ema[k]) for k in full_ema)
    adam, adam_resumed = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for key, state in adam["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name], adam_resumed["state"][key][name])
    assert full.trainer.lr_scheduler_configs[0].scheduler.state_dict() == (
        resumed.trainer.lr_scheduler_configs[0].scheduler.state_dict()
    )


def test_diffusion_nft_resumes_exactly(tmp_path, tiny_model_dir, prompts2):
    """DiffusionNFT stopped after one batch and resumed equals a run of two batches: metrics and weights."""
    nft = ("--model.algorithm=diffusion-nft", "--ema=null")
    full = build_cli(fit_args(tmp_path / "full", tiny_model_dir, prompts2, "--trainer.max_steps=4", *nft))
    build_cli(fit_args(tmp_path / "cut", tiny_model_dir, prompts2, "--trainer.max_steps=2", *nft))
    resumed = build_cli(fit_args(tmp_path / "cut", tiny_model_dir, prompts2, "--trainer.max_steps=4", "--ckpt_path=last", *nft))
    assert resumed.trainer.global_step == 4
    metrics = scalars(tmp_path / "full" / "logs")
    assert len(metrics["train/old_deviation"]) == 2
    assert_same_metrics(metrics, scalars(tmp_path / "cut" / "logs"))
    assert_same_tensors(lora_state_dict(full.model.transformer), lora_state_dict(resumed.model.transformer))


def test_same_seed_same_metrics(reference, tmp_path, tiny_model_dir, prompts2):
    """Determinism: the same config and seed on the same machine give identical metrics and weights."""
    full, full_root = reference
    again = build_cli(fit_args(tmp_path, tiny_model_dir, prompts2, "--trainer.max_steps=6"))
    assert_same_metrics(scalars(full_root / "logs"), scalars(tmp_path / "logs"))
    assert_same_tensors(lora_state_dict(full.model.transformer), lora_state_dict(again.model.transformer))


def start_fit_until_first_checkpoint(tmp_path, model_dir, prompts) -> tuple[subprocess.Popen, Path]:
    """``train.py fit`` of 6 optimizer steps in a subprocess, returned once its first last.ckpt exists."""
    args = fit_args(tmp_path, model_dir, prompts, "--trainer.max_steps=6")
    # CPU sums split over threads: bit-identical numbers need the same thread count as this process
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    process = subprocess.Popen(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = tmp_path / "logs" / "tpgrpo" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    try:
        while not checkpoint.exists():  # appears only complete (atomic rename)
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    return process, checkpoint


def assert_resume_finishes_the_reference_run(reference, checkpoint, tmp_path, model_dir, prompts) -> None:
    """The stopped run's checkpoint is mid-run, and ``--ckpt_path last`` ends where the uninterrupted run did."""
    full, full_root = reference
    saved_step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= saved_step < 6  # stopped mid-run
    resumed = build_cli(fit_args(tmp_path, model_dir, prompts, "--trainer.max_steps=6", "--ckpt_path=last"))
    assert resumed.trainer.global_step == 6
    assert_same_metrics(scalars(full_root / "logs"), scalars(tmp_path / "logs"))
    assert_same_tensors(lora_state_dict(full.model.transformer), lora_state_dict(resumed.model.transformer))


def test_sigkill_mid_run_then_resume(reference, tmp_path, tiny_model_dir, prompts2):
    """A real ``kill -9`` of ``train.py fit`` after its first checkpoint; ``--ckpt_path last`` finishes the run exactly."""
    process, checkpoint = start_fit_until_first_checkpoint(tmp_path, tiny_model_dir, prompts2)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert_resume_finishes_the_reference_run(reference, checkpoint, tmp_path, tiny_model_dir, prompts2)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1])
def test_a_run_told_to_stop_writes_its_last_checkpoint_and_resumes_exactly(reference, tmp_path, tiny_model_dir, prompts2, number):
    """SIGTERM (or SLURM's SIGUSR1) after the first checkpoint: the run checkpoints at the next batch
    boundary, after that batch's validation, exits 0; ``--ckpt_path last`` gives the uninterrupted run."""
    process, checkpoint = start_fit_until_first_checkpoint(tmp_path, tiny_model_dir, prompts2)
    process.send_signal(number)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert f"{signal.Signals(number).name} received: the last checkpoint is written at step" in stderr.decode()
    assert_resume_finishes_the_reference_run(reference, checkpoint, tmp_path, tiny_model_dir, prompts2)


def test_ckpt_path_last_searches_every_logger_version(tmp_path, tiny_model_dir, prompts2):
    """Also with the stock ModelCheckpoint; with nothing to resume, a warning and a fresh start."""
    stock = (
        "--trainer.callbacks=[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, "
        "init_args: {save_last: true, every_n_train_steps: 2, save_top_k: 0}}]"
    )
    with pytest.warns(UserWarning, match="no last checkpoint of this run was found; training starts from scratch"):
        first = build_cli(fit_args(tmp_path, tiny_model_dir, prompts2, stock, "--trainer.max_steps=2", "--ckpt_path=last"))
    assert first.trainer.ckpt_path is None and first.trainer.global_step == 2
    assert [type(c) for c in first.trainer.checkpoint_callbacks] == [ModelCheckpoint]  # it replaced the base one
    again = build_cli(fit_args(tmp_path, tiny_model_dir, prompts2, stock, "--trainer.max_steps=4", "--ckpt_path=last"))
    assert again.trainer.ckpt_path == first.trainer.checkpoint_callback.last_model_path
    assert Path(again.trainer.log_dir).name == "version_1" and again.trainer.global_step == 4


def test_checkpoint_holds_lora_and_training_state_only(reference, tiny_model_dir):
    full, _ = reference
    path = Path(full.trainer.checkpoint_callback.last_model_path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors and types only
    lora = {k for k, p in full.model.named_parameters() if p.requires_grad}
    assert set(checkpoint["state_dict"]) == lora
    for key in ("optimizer_states", "lr_schedulers", "loops", "callbacks", "tpgrpo"):
        assert checkpoint[key], key
    assert checkpoint["callbacks"]["LoRAEMA"]["shadow"]
    assert set(checkpoint["tpgrpo"]) == {"skipped_steps", "bad_steps", "rng_states"}
    model_bytes = sum(f.stat().st_size for f in Path(tiny_model_dir).rglob("*.safetensors"))
    assert path.stat().st_size < 0.1 * model_bytes
    assert not list(path.parent.glob("*.tmp"))  # no temporary file left behind


def test_checkpoint_hooks_keep_counters_and_reject_a_foreign_lora(reference):
    model = reference[0].model
    checkpoint = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    model.skipped_steps, model.bad_steps = 3, 1
    model.on_save_checkpoint(checkpoint)
    model.skipped_steps = model.bad_steps = 0
    rng_before = torch.get_rng_state()
    torch.rand(3)
    model.on_load_checkpoint(checkpoint)
    assert (model.skipped_steps, model.bad_steps) == (3, 1)
    assert torch.equal(torch.get_rng_state(), rng_before)  # torch.rand undone: back to the saved state
    missing = dict(checkpoint, state_dict=dict(list(checkpoint["state_dict"].items())[1:]))
    with pytest.raises(UserInputError, match="LoRA weights missing"):
        model.on_load_checkpoint(missing)
    key = next(iter(checkpoint["state_dict"]))
    wrong = dict(checkpoint, state_dict={**checkpoint["state_dict"], key: torch.zeros(1, 1)})
    with pytest.raises(UserInputError, match="has shape"):
        model.on_load_checkpoint(wrong)
    model.skipped_steps = model.bad_steps = 0


# ------------------------------------------------------------ atomic saves and step counting (no model)
class TwoStepsPerBatch(LightningModule):
    """Manual optimisation with two optimizer steps per batch, like TPGRPOModule."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.lora_weight = torch.nn.Parameter(torch.zeros(3))

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(2):
            optimizer.zero_grad()
            self.manual_backward(((self.lora_weight - batch.float().mean()) ** 2).sum())
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(torch.arange(8.0), batch_size=1)


def small_trainer(root, callbacks, max_steps=8):
    return Trainer(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, callbacks=callbacks,
    )


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path):
    checkpoint = AtomicCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_top_k=0)

    class CrashOnSecondSave(TwoStepsPerBatch):
        def on_train_batch_start(self, batch, batch_idx):
            if batch_idx == 1:  # the disk fills up in the middle of writing the step-4 checkpoint
                io = self.trainer.strategy.checkpoint_io

                def half_written(state, path, storage_options=None):
                    Path(path).write_bytes(b"\x80\x02 truncated")
                    raise OSError(28, "No space left on device")

                io.save_checkpoint = half_written

    with pytest.raises(OSError, match="No space left"):
        small_trainer(tmp_path, [checkpoint]).fit(CrashOnSecondSave())
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2  # the previous checkpoint, intact
    assert (tmp_path / "last.ckpt.tmp").exists() and not list(tmp_path.glob("last-v*.ckpt"))


def test_every_n_train_steps_counts_optimizer_steps_across_batches(tmp_path):
    """Batches take 2 optimizer steps: N=3 saves when a batch crosses 3, 6, 9, ... (the stock callback misses 3 and 9)."""
    ours = AtomicCheckpoint(dirpath=tmp_path / "ours", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    stock = ModelCheckpoint(dirpath=tmp_path / "stock", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    small_trainer(tmp_path, [ours, stock], max_steps=12).fit(TwoStepsPerBatch())
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["step=10.ckpt", "step=12.ckpt", "step=4.ckpt", "step=6.ckpt"]
    assert sorted(p.name for p in (tmp_path / "stock").iterdir()) == ["step=12.ckpt", "step=6.ckpt"]


class Validated(TwoStepsPerBatch):
    """Validation after every batch; counts the validations that ended."""

    def __init__(self, val_items: int):
        super().__init__()
        self.val_items = val_items
        self.validated_at: list[int] = []

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):  # (runs before the callbacks' on_validation_end)
        self.validated_at.append(self.global_step)

    def val_dataloader(self):
        return DataLoader(torch.arange(float(self.val_items)), batch_size=1)


class RecordingCheckpoint(AtomicCheckpoint):
    def _save_checkpoint(self, trainer, filepath):
        self.saves = getattr(self, "saves", []) + [(trainer.global_step, list(trainer.lightning_module.validated_at))]
        super()._save_checkpoint(trainer, filepath)


@pytest.mark.parametrize("val_items", [2, 0])
def test_a_save_waits_for_the_validation_that_follows_its_batch(tmp_path, val_items):
    """So a run killed during validation resumes from before that batch and logs the validation again."""
    checkpoint = RecordingCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=2, save_top_k=0)
    trainer = Trainer(
        accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[checkpoint], val_check_interval=1, check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
    )
    module = Validated(val_items)
    trainer.fit(module)
    if val_items:  # each save comes after the validation of its step
        assert checkpoint.saves == [(2, [2]), (4, [2, 4]), (6, [2, 4, 6])]
    else:  # no validation data: saved at the end of each batch
        assert [step for step, _ in checkpoint.saves] == [2, 4, 6] and not module.validated_at


def test_ema_updates_when_a_batch_crosses_its_interval(tmp_path):
    """every=1 with 2 optimizer steps per batch: one update with decay², the same as two updates of the same weights."""
    ema = LoRAEMA(decay=0.5, every=1)
    module = TwoStepsPerBatch()
    small_trainer(tmp_path, [ema], max_steps=2).fit(module)
    assert ema._last_step == 2
    torch.testing.assert_close(ema.shadow["lora_weight"], 0.75 * module.lora_weight.detach())  # keyed by name
    ema3 = LoRAEMA(decay=0.5, every=3)
    small_trainer(tmp_path, [ema3], max_steps=8).fit(TwoStepsPerBatch())
    assert ema3._last_step == 6  # updated after the batches ending at steps 4 (crossed 3) and 6, not 2 or 8


# -------------------------------------------------------------------------------------- export
@torch.no_grad()
def transformer_output(transformer, seed=0):
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return transformer(
        hidden_states=torch.randn(2, config.in_channels, 8, 8, generator=g),
        encoder_hidden_states=torch.randn(2, 5, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(2, config.pooled_projection_dim, generator=g),
        timestep=torch.tensor([700.0, 300.0]),
        return_dict=False,
    )[0]


def test_export_callback_and_command_load_into_a_plain_pipeline(reference, tmp_path, tiny_model_dir, capsys):
    from tpgrpo.export import main as export_main
    from tpgrpo.tiny.components import load_pipeline

    full, _ = reference
    exporter = next(c for c in full.trainer.callbacks if isinstance(c, LoRAExport))
    exported = Path(full.trainer.log_dir) / "lora"
    assert exporter.last_export == exported and (exported / "pytorch_lora_weights.safetensors").is_file()
    with ema_of(full.trainer).swapped_in(full.model):
        expected = transformer_output(full.model.transformer)  # the EMA weights
        ema_lora = lora_state_dict(full.model.transformer)
    raw = transformer_output(full.model.transformer)
    assert not torch.allclose(raw, expected)

    pipe = load_pipeline(tiny_model_dir)
    pipe.load_lora_weights(exported)
    torch.testing.assert_close(transformer_output(pipe.transformer), expected, atol=1e-5, rtol=1e-5)

    last = full.trainer.checkpoint_callback.last_model_path
    export_main(["--ckpt", last, "--out", str(tmp_path / "cmd")])  # hyper-parameters from the checkpoint
    assert "EMA" in capsys.readouterr().out
    from_file = load_file(tmp_path / "cmd" / "pytorch_lora_weights.safetensors")
    assert_same_tensors(from_file, load_file(exported / "pytorch_lora_weights.safetensors"))
    assert_same_tensors({k.removeprefix("transformer."): v for k, v in from_file.items()}, ema_lora)

    overrides = [a for a in cli_args(tmp_path, tiny_model_dir, "x.jsonl") if a.startswith("--model.")]
    export_main(["--ckpt", last, "--config", "configs/tiny.yaml", *overrides, "--no-ema", "--out", str(tmp_path / "raw")])
    pipe = load_pipeline(tiny_model_dir)
    pipe.load_lora_weights(tmp_path / "raw")
    torch.testing.assert_close(transformer_output(pipe.transformer), raw, atol=1e-5, rtol=1e-5)


def test_export_errors_are_one_line(reference, tmp_path, capsys):
    from tpgrpo.export import main as export_main

    last = reference[0].trainer.checkpoint_callback.last_model_path
    for argv, message in [
        (["--ckpt", str(tmp_path / "none.ckpt")], "checkpoint not found"),
        (["--ckpt", last, "--config", "configs/tiny.yaml"], "model.lora.rank=4"),  # the config's rank is 16
        (["--ckpt", last, "--model.no_such=1"], "unknown model setting"),
    ]:
        with pytest.raises(SystemExit) as stop:
            export_main([*argv, "--out", str(tmp_path / "out")])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert message in err and [line.startswith("error:") for line in err.splitlines()].count(True) == 1, err


# ---------------------------------------------------------------------------------- input guards
def one_line_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


@pytest.mark.parametrize(
    "config, message",
    [
        ("model:\n  num_steps: [1, 2\n", "invalid YAML at line 3, column 1"),
        ("model:\n  noise_level: 0.5\n\tclip_range: 0.1\n", "invalid YAML at line 3"),
        ("- model\n- data\n", "must be a mapping"),
        ("model:\n  noise_levle: 0.5\n", "did you mean model.sampling.noise_level?"),
        ("modle:\n  noise_level: 0.5\n", "did you mean model.sampling.noise_level?"),
        ("model:\n  sampling:\n    num_steps: many\n", 'Parser key "model.sampling.num_steps"'),
        ("model:\n  num_steps: 3\n", "did you mean model.sampling.num_steps?"),
        ("model:\n  update:\n    clip_range: [0.1]\n", "clip_range"),
    ],
)
def test_config_file_errors(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    assert message in one_line_error(capsys, ["fit", "--config", "configs/tiny.yaml", "--config", str(path)])


class RunsCodeWhenUnpickled:
    """Unpickling calls ``open(marker, "w")``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_ckpt_path_that_is_no_checkpoint_is_one_line_and_never_unpickled(tmp_path, tiny_model_dir, prompt_file, capsys):
    import pickle

    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    marker = tmp_path / "code_ran"
    plain_pickle = tmp_path / "plain.ckpt"
    plain_pickle.write_bytes(pickle.dumps({"state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}))
    torch_pickle = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "payload": RunsCodeWhenUnpickled(marker)}, torch_pickle)
    args = ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file)]
    for path, message in [
        (garbage, "not a checkpoint (not a file written by torch.save)"),
        (plain_pickle, "not a checkpoint (not a file written by torch.save)"),
        (torch_pickle, "refusing to unpickle it (it holds io.open)"),
        (tmp_path / "missing.ckpt", "checkpoint not found"),
    ]:
        line = one_line_error(capsys, [*args, f"--ckpt_path={path}"])
        assert line.startswith(f"error: --ckpt_path {path}: {message}"), line
        assert "weights_only" not in line
    assert not marker.exists()  # nothing was unpickled


def test_missing_config_file(tmp_path, capsys):
    assert "config file not found" in one_line_error(capsys, ["fit", "--config", str(tmp_path / "nope.yaml")])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.sampling.num_steps=abc", 'Parser key "model.sampling.num_steps"'),
        ("--model.lora_rnk=3", "did you mean model.lora.rank?"),
        ("--model.sampling.noise_level=0", "sampling.noise_level must be > 0"),
        ("--model.sampling.noise_level=1.5", "sampling.noise_level of a 'cps' step must be in [0, 1], got 1.5"),
        ("--model.sampling.window_range=[2, 3]", "window_range (2, 3)"),
        ("--model.update.clip_range=0", "clip_range"),
        ("--model.update.clip_range=1.5", "clip_range"),
        ("--model.optimizer.learning_rate=inf", "learning_rate"),
        ("--model.credit.advantage_eps=0", "advantage_eps"),
        ("--model.optimizer.betas=[0.9, 1.0]", "optimizer.betas"),
        ("--model.update.train_micro_batch=0", "train_micro_batch"),
        ("--data.group_size=1", "data.group_size must be >= 2"),
        ("--model.update.optimizer_steps_per_batch=9", "optimizer_steps_per_batch (9) is larger than the images of a batch"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, tiny_model_dir, prompt_file, capsys, override, message):
    # 2 prompts × 4 images per batch
    line = one_line_error(capsys, ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), override])
    assert message in line, line


def test_prompt_file_errors(tmp_path, tiny_model_dir, prompt_file, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a photo of a circle\nun carré rouge\n".encode("latin-1"))
    line = one_line_error(capsys, ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), f"--data.train_prompts={latin1}"])
    assert "latin1.txt, line 2: not UTF-8" in line

    original = Path.read_bytes

    def unreadable(self):
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return original(self)

    locked = tmp_path / "locked.txt"
    locked.write_text("a photo of a circle\n")
    monkeypatch.setattr(Path, "read_bytes", unreadable)
    line = one_line_error(capsys, ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), f"--data.train_prompts={locked}"])
    assert "locked.txt: cannot read the prompt file (Permission denied)" in line


def test_a_too_long_prompt_is_truncated_with_one_warning(tmp_path, tiny_model_dir, prompt_file):
    import logging
    import warnings

    model = build_cli(cli_args(tmp_path, tiny_model_dir, prompt_file), run=False).model
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    pipeline_logger = logging.getLogger(type(model.flow.pipe).__module__)
    pipeline_logger.addHandler(handler)
    limit = model.flow.pipe.tokenizer.model_max_length
    long = "a photo of " + " ".join(["red circle"] * limit)
    longer = long + " and a blue square"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for prompts in ([long, "a photo of a circle"], [long], [longer, "a photo of a square"]):
            cond = model.algorithm.encode(prompts)
            assert cond.prompt_embeds.shape[0] == len(prompts)
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"reads at most {limit}" in messages[0] and "a photo of red circle" in messages[0]
    assert not [r for r in records if "truncated because" in r.getMessage()]  # diffusers' repeats are silenced
    model.flow.encode([long])  # without the check, diffusers logs it at every call
    pipeline_logger.removeHandler(handler)
    assert [r for r in records if "truncated because" in r.getMessage()]
    # a truncated prompt gets the same embedding as its first `limit` tokens
    head = " ".join(long.split()[: limit - 2])
    torch.testing.assert_close(model.algorithm.encode([long]).prompt_embeds, model.algorithm.encode([head]).prompt_embeds)


# ------------------------------------------------------------------------------ failing rewards
def test_a_failing_reward_stops_training_naming_the_reward(tmp_path, tiny_model_dir, prompt_file):
    from tpgrpo.rewards.base import REWARDS, Reward, register_reward

    if "always_times_out" not in REWARDS:

        @register_reward("always_times_out")
        class AlwaysTimesOut(Reward):
            def score(self, images, prompts, metadata):
                raise TimeoutError("the reward server did not answer within 30 s")

    args = ["fit", *cli_args(tmp_path, tiny_model_dir, prompt_file), "--model.rewards={shapes: 1.0, always_times_out: 0.5}"]
    with pytest.raises(RuntimeError, match="reward 'always_times_out' failed: the reward server did not answer") as info:
        build_cli(args)
    assert isinstance(info.value.__cause__, TimeoutError)
