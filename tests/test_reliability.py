"""Reliability: exact resume, atomic checkpoints, LoRA export, input guards, determinism, failing rewards."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from test_train import cli_args
from tpgrpo.cli import build_cli
from tpgrpo.lora import lora_state_dict

EXACT_TAGS = ("train/reward_mean", "train/policy_loss")
TIMING_TAGS = ("train/images_per_second",)


def callbacks_arg(every: int = 1, ema: bool = True, export: bool = False, extra: str = "") -> str:
    """A ``--trainer.callbacks`` value: EMA (updated every 2 optimizer steps), atomic checkpoints every ``every`` steps."""
    items = []
    if ema:
        items.append("{class_path: tpgrpo.ema.LoRAEMA, init_args: {decay: 0.5, every: 2}}")
    items.append(
        "{class_path: tpgrpo.callbacks.AtomicCheckpoint, init_args: "
        f"{{save_last: true, every_n_train_steps: {every}, save_top_k: 0}}}}"
    )
    if export:
        items.append("{class_path: tpgrpo.callbacks.LoRAExport, init_args: {dirname: lora}}")
    if extra:
        items.append(extra)
    return "--trainer.callbacks=[" + ", ".join(items) + "]"


def run_fit(tmp_path, model_dir, prompts, *extra, ckpt_path=None):
    args = ["fit", *cli_args(tmp_path, model_dir, prompts, *extra)]
    if ckpt_path is not None:
        args.append(f"--ckpt_path={ckpt_path}")
    return build_cli(args)


def scalars(log_root: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every run version under ``log_root``: tag -> {step: value} (later versions win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for version in sorted(log_root.glob("*/version_*"), key=lambda p: int(p.name.split("_")[1])):
        events = EventAccumulator(str(version))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            for event in events.Scalars(tag):
                out.setdefault(tag, {})[event.step] = event.value
    return out


def assert_same_metrics(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for tag in a:
        if tag in TIMING_TAGS:
            continue
        assert a[tag].keys() == b[tag].keys(), tag
        for step in a[tag]:
            x, y = a[tag][step], b[tag][step]
            assert (math.isnan(x) and math.isnan(y)) or x == y, (tag, step, x, y)


def assert_same_lora(a, b) -> None:
    sa, sb = lora_state_dict(a.transformer), lora_state_dict(b.transformer)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ------------------------------------------------------------------------------------- resume
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, tiny_model_dir, prompt_file):
    """6 optimizer steps (3 batches over 2 epochs) vs. 2 steps, stop, resume with ckpt_path=last to 6."""
    common = (callbacks_arg(every=1), "--model.kl_beta=0.01")
    full = run_fit(tmp_path / "full", tiny_model_dir, prompt_file, *common, "--trainer.max_steps=6")
    assert full.trainer.global_step == 6

    part = run_fit(tmp_path / "part", tiny_model_dir, prompt_file, *common, "--trainer.max_steps=2")
    assert part.trainer.global_step == 2
    resumed = run_fit(tmp_path / "part", tiny_model_dir, prompt_file, *common, "--trainer.max_steps=6", ckpt_path="last")
    assert resumed.trainer.global_step == 6

    metrics_full = scalars(tmp_path / "full" / "logs")
    metrics_resumed = scalars(tmp_path / "part" / "logs")
    for tag in EXACT_TAGS:
        assert len(metrics_full[tag]) == 3, tag
    assert_same_metrics(metrics_full, metrics_resumed)
    assert_same_lora(full.model, resumed.model)

    ema = [c for c in full.trainer.callbacks if type(c).__name__ == "LoRAEMA"][0]
    ema_resumed = [c for c in resumed.trainer.callbacks if type(c).__name__ == "LoRAEMA"][0]
    assert all(torch.equal(x, y) for x, y in zip(ema.shadow, ema_resumed.shadow))
    state, state_resumed = full.trainer.optimizers[0].state_dict(), resumed.trainer.optimizers[0].state_dict()
    for key in state["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["state"][key][name], state_resumed["state"][key][name])
