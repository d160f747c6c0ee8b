"""Benchmark: one whole training batch (rollout, decode, rewards, credit, update), TP-GRPO against Flow-GRPO.

Each measurement is a real ``train.py fit`` of one rollout batch (the LightningModule's own
training step, `tpgrpo.algorithms`, its optimizer steps) with the phase seconds the step
reports (``time/*`` in TensorBoard), the NFE per image, images per second and the peak memory.
Cases:

* ``tiny``: configs/tiny.yaml as `make demo` trains it (the shipped model, shapes reward).
* ``sd3``: an SD3.5-Medium-shaped pipeline saved to a temporary folder: the transformer with the
  real architecture config (``--sd3-layers`` of its 24 layers; random weights), random CLIP text
  encoders as small as possible whose outputs have the real widths (pooled 2048, tokens padded to
  4096; no T5, whose tokens are zeros of the real shape), and a small random VAE with SD3's 16
  latent channels and 8x scale; configs/sd3.yaml's recipe (10 steps, window 9, CFG 4.5) at
  ``--sd3-resolution`` with the ``jpeg_incompressibility`` reward (no weights to download).

    python benchmarks/step.py                      # CPU: both cases, a few minutes on 2 cores
    python benchmarks/step.py --device cuda --sd3-layers 24 --sd3-resolution 512

Writes ``benchmarks/results/step.json`` and prints one summary line; the headline is TP-GRPO's
step time over Flow-GRPO's.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rollout import SD3_SHIFT, machine, peak_memory_increase_mib, sd35_medium_config, start_peak_memory  # noqa: E402
from tpgrpo.cli import build_cli  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "step.json"
METHODS = {"tp-grpo": "TP-GRPO", "flow-grpo": "Flow-GRPO"}
UPDATE_METRICS = ("train/ratio", "train/first_ratio", "train/clip_frac", "train/log_prob_diff", "train/policy_loss")


class StepRecorder(Callback):
    """Wall clock, phase seconds, NFE and peak memory of every training batch."""

    def __init__(self, device: torch.device):
        self.device = device
        self.batches: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = start_peak_memory(self.device)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self._started
        images = len(batch["prompts"])
        self.batches.append({
            "seconds": seconds,
            "phases": dict(outputs["timings"]),
            "images": images,
            "images_per_second": images / seconds,
            "nfe_per_image": outputs["nfe_per_image"],
            "peak_memory_mib": peak_memory_increase_mib(self.device, self._before),
        })


def save_sd3_shaped(folder: Path, layers: int, resolution: int, seed: int = 0) -> Path:
    """Save the SD3.5-Medium-shaped pipeline described in the module docstring; return the folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from tpgrpo.tiny.components import _text_encoder, build_tokenizer, build_vae

    config = sd35_medium_config(layers, sample_size=resolution // 8)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**config)
    tokenizer = build_tokenizer(max_length=77)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT),
        vae=build_vae(seed, latent_channels=16, block_out_channels=(32, 32, 32, 32), image_size=resolution,
                      scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_text_encoder(tokenizer, 32, 768, 1, seed),  # pooled widths 768 + 1280 = 2048, as CLIP-L + CLIP-G
        tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, 32, 1280, 1, seed + 1),
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(folder)
    return folder


def case_overrides(args: argparse.Namespace, case: str, folder: Path | None) -> list[str]:
    common = [f"--trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}"]
    if case == "tiny":
        return ["--config", "configs/tiny.yaml", *common]
    return [
        "--config", "configs/sd3.yaml", *common,
        f"--model.pretrained_path={folder}",
        "--model.rewards={jpeg_incompressibility: 1.0}",
        f"--model.weights_dtype={'bfloat16' if args.device.startswith('cuda') else 'float32'}",
        f"--model.sampling.resolution={args.sd3_resolution}",
        f"--data.prompts_per_step={args.sd3_prompts}",
        f"--data.group_size={args.sd3_group}",
        "--data.train_prompts=data/geneval/train.jsonl",
        f"--trainer.precision={'bf16-mixed' if args.device.startswith('cuda') else '32-true'}",
    ]


def measure(args: argparse.Namespace, case: str, method: str, folder: Path | None, *extra: str) -> dict:
    """One ``fit`` of ``warmup + batches`` rollout batches; the fastest measured batch, with the
    last step's ratio statistics (``extra``: more train.py overrides)."""
    overrides = [
        *case_overrides(args, case, folder),
        f"--model.algorithm={method}",
        "--data.val_prompts=null", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--ema=null", "--export=null", "--images=null",
        f"--trainer.default_root_dir={args.work}",
        f"--model.prompt_cache.folder={args.work / 'embeddings'}",
        *args.overrides,
        *extra,
    ]
    cli = build_cli(overrides, run=False)
    steps_per_batch = cli.model.update_config.optimizer_steps_per_batch
    cli.trainer.fit_loop.epoch_loop.max_steps = steps_per_batch * (args.warmup + args.batches)
    recorder = StepRecorder(torch.device(args.device))
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    measured = recorder.batches[args.warmup:]
    best = min(measured, key=lambda b: b["seconds"])
    logged = {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith(UPDATE_METRICS)}
    return {**best, "all_seconds": [round(b["seconds"], 3) for b in measured], "update_metrics": logged}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="tiny,sd3", help="comma-separated subset of tiny,sd3")
    parser.add_argument("--methods", default="tp-grpo,flow-grpo", help="comma-separated algorithms (model.algorithm)")
    parser.add_argument("--batches", type=int, default=1, help="measured rollout batches per method (best is kept)")
    parser.add_argument("--warmup", type=int, default=0, help="batches run before measuring (compile, allocator)")
    parser.add_argument("--sd3-layers", type=int, default=2, help="of the real 24")
    parser.add_argument("--sd3-resolution", type=int, default=128, help="pixels (the recipe: 512)")
    parser.add_argument("--sd3-prompts", type=int, default=1, help="prompts per batch")
    parser.add_argument("--sd3-group", type=int, default=4, help="images per prompt")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="after --: train.py overrides for every run")
    args = parser.parse_args(argv)
    args.work = Path(tempfile.mkdtemp(prefix="tpgrpo_step_"))
    return args


def summary(results: dict) -> str:
    parts = []
    for case, methods in results["cases"].items():
        timed = [f"{METHODS[m]} {r['seconds']:.1f}s ({r['nfe_per_image']} NFE, update {r['phases']['update']:.1f}s)"
                 for m, r in methods.items() if m in METHODS]
        ratio = f" = {methods['step_time_ratio']:.2f}" if "step_time_ratio" in methods else ""
        parts.append(f"{case}: {' / '.join(timed)}{ratio}")
    return "whole-step benchmark: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - {"tiny", "sd3"})
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}; choose from tiny, sd3")
    results = {"machine": machine(torch.device(args.device)), "args": {k: str(v) for k, v in vars(args).items()}, "cases": {}}
    for case in cases:
        folder = save_sd3_shaped(args.work / "sd3_shaped", args.sd3_layers, args.sd3_resolution) if case == "sd3" else None
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        methods = {method: measure(args, case, method, folder) for method in chosen}
        if {"tp-grpo", "flow-grpo"} <= set(methods):
            methods["step_time_ratio"] = methods["tp-grpo"]["seconds"] / methods["flow-grpo"]["seconds"]
        results["cases"][case] = methods
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    line = summary(results)
    print(line)
    return results


if __name__ == "__main__":
    main()
