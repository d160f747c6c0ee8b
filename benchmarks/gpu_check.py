"""What only a GPU can show, in one run: the real-size TP-GRPO step in bf16, compiled and not.

On one large GPU (the budget is 8 minutes) it records, into ``benchmarks/results/gpu_check.json``:

1. a bf16 TP-GRPO step and a Flow-GRPO step of the SD3.5-Medium-shaped pipeline of
   `benchmarks/step.py` (all 24 transformer layers, random weights, 512 px, configs/sd3.yaml's
   recipe at ``--prompts`` prompts × 24 images): seconds per phase, rollout NFE per second, peak
   memory, the first optimizer step's ratio range (``train/first_ratio_min`` / ``_max``), and the model FLOP utilisation from FLOPs counted
   with `torch.utils.flop_counter` on one transformer evaluation;
2. the same TP-GRPO step with ``model.compute.compile`` (one warm-up batch compiles);
3. single-device smoke runs of ``--trainer.strategy fsdp`` (FSDP1) and ``fsdp2`` on the shipped model;
4. a 2-step fit of each other family's config (FLUX.1, Qwen-Image, FLUX.2 [klein] and [dev], Z-Image:
   bf16 weights, bf16-mixed, the config's strategy) on the tiny random stand-in of its real classes.

``--cpu`` is a reduced mode for the test suite (1 layer, 32 px, 2 images, no compile, Z-Image's
stand-in only) so the script cannot rot; its figures mean nothing.

    python benchmarks/gpu_check.py            # on a GPU machine
    python benchmarks/gpu_check.py --cpu      # the reduced check
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import step as step_benchmark  # noqa: E402
from benchmarks.rollout import machine, sd35_medium_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu_check.json"
PARTS = ("steps", "strategies", "families")
# dense bf16 tensor-core peaks (FLOP/s) by name fragment, from the vendors' data sheets
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(name: str) -> float | None:
    return next((value for key, value in PEAK_BF16.items() if key in name), None)


def flops_per_evaluation(layers: int, resolution: int, text_tokens: int, cfg: bool) -> float:
    """FLOPs of one velocity evaluation (a CFG pair when ``cfg``) of the SD3.5-M-shaped transformer, counted."""
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = sd35_medium_config(layers, sample_size=resolution // 8)
    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**config)
    batch, side = 2 if cfg else 1, resolution // 8
    inputs = dict(
        hidden_states=torch.zeros(batch, 16, side, side, device="meta"),
        encoder_hidden_states=torch.zeros(batch, text_tokens, config["joint_attention_dim"], device="meta"),
        pooled_projections=torch.zeros(batch, config["pooled_projection_dim"], device="meta"),
        timestep=torch.zeros(batch, device="meta"),
        return_dict=False,
    )
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        transformer(**inputs)
    return float(counter.get_total_flops())


def step_flops(result: dict, per_evaluation: float, window: int, kl: bool, checkpointing: bool) -> float:
    """Model FLOPs of one step: the rollout's evaluations, and the update's forward + backward
    (≈ 3 forwards; one more with gradient checkpointing) of each image's ``window`` transitions,
    plus the KL reference's forward."""
    images = result["images"]
    rollout = result["nfe_per_image"] * images * per_evaluation
    update = images * window * per_evaluation * (3 + (1 if checkpointing else 0) + (1 if kl else 0))
    return rollout + update


def run_fit(arguments: list[str], work: Path, device: str) -> dict:
    """A 2-step single-device ``train.py fit`` with ``arguments``, logging under ``work``; its exit
    status, seconds and (when it failed) last lines."""
    accelerator = "gpu" if device.startswith("cuda") else "cpu"
    command = [
        sys.executable, "train.py", "fit", *arguments, "--trainer.max_steps=2", "--data.val_prompts=null",
        f"--trainer.accelerator={accelerator}", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={work}", f"--trainer.logger.init_args.save_dir={work}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return {"returncode": done.returncode, "seconds": time.perf_counter() - started,
            "tail": (done.stdout + done.stderr)[-1500:] if done.returncode else ""}


def smoke(strategy: str, work: Path, device: str) -> dict:
    """The shipped model under ``strategy`` on one device."""
    arguments = ["--config", "configs/tiny.yaml", "--data.prompts_per_step=2", "--data.group_size=4",
                 f"--trainer.strategy={strategy}"]
    return run_fit(arguments, work / strategy, device)


def family_smoke(family: str, work: Path, device: str) -> dict:
    """The family's config (bf16 weights, bf16-mixed, its strategy) on the tiny random stand-in the
    offline tests use: 32 px, 3 steps, 2 images, one device."""
    from tests.helpers import tiny_models

    config, build = tiny_models.STAND_INS[family]
    max_sequence_length = tiny_models.SEQUENCE_LENGTHS[family]
    folder = work / family / "model"
    build().save_pretrained(folder)
    prompts = work / family / "prompts.txt"
    prompts.write_text("a photo of a dog\na red cat on a bench\n")
    arguments = [
        "--config", config, f"--model.pretrained_path={folder}", f"--model.max_sequence_length={max_sequence_length}",
        f"--data.train_prompts={prompts}", "--data.test_prompts=null", "--data.prompts_per_step=1",
        "--data.group_size=2", "--model.rewards={jpeg_incompressibility: 1.0}", "--model.sampling.resolution=32",
        "--model.sampling.num_steps=3", "--model.sampling.window_size=2", "--model.sampling.window_range=[0, 2]",
        "--model.update.train_micro_batch=2", "--model.lora.rank=2", "--model.lora.alpha=4",
        "--images.every_n_train_steps=0", f"--model.prompt_cache.folder={work / family / 'embeddings'}",
    ]
    return run_fit(arguments, work / family, device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the reduced check the test suite runs")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step (× 24 images)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds; later parts are skipped past it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; run with --cpu for the reduced check")
    layers, resolution, group = (1, 32, 2) if args.cpu else (24, 512, 24)
    bench = step_benchmark.parse_args([
        f"--device={device}", "--cases=sd3", f"--sd3-layers={layers}", f"--sd3-resolution={resolution}",
        f"--sd3-prompts={args.prompts}", f"--sd3-group={group}",
        *(["--", "--model.sampling.num_steps=3", "--model.sampling.window_size=2", "--model.sampling.window_range=[0, 2]"] if args.cpu else []),
    ])
    if "steps" in args.parts:  # building the full-size model takes minutes of CPU time
        folder = step_benchmark.save_sd3_shaped(bench.work / "sd3_shaped", layers, resolution)
    if args.cpu:  # four prompts: building the embedding cache of all GenEval prompts is not what this checks
        prompts = bench.work / "prompts.txt"
        prompts.write_text("a photo of a cat\na photo of two dogs\na red car\na blue bench\n")
        bench.overrides.append(f"--data.train_prompts={prompts}")
    out: dict = {"machine": machine(torch.device(device)), "mode": "cpu-reduced" if args.cpu else "gpu", "skipped": []}

    def within_budget(part: str) -> bool:
        if time.perf_counter() - started < args.budget:
            return True
        out["skipped"].append(f"{part}: past the {args.budget:.0f} s budget")
        return False

    runs = {}
    for name, method, extra, warmup in (
        ("tp_eager", "tp-grpo", (), 0),
        ("flow_grpo_eager", "flow-grpo", (), 0),
        ("tp_compiled", "tp-grpo", ("--model.compute.compile=true",), 1),
    ):
        if "steps" not in args.parts:
            continue
        if name == "tp_compiled" and args.cpu:
            out["skipped"].append("tp_compiled: compiling takes minutes on a CPU (tests/test_acceleration.py covers it, slow)")
            continue
        if within_budget(name):
            bench.warmup = warmup
            runs[name] = step_benchmark.measure(bench, "sd3", method, folder, *extra)
    out["runs"] = runs
    window = 2 if args.cpu else 9
    text_tokens = 77 + 128  # CLIP tokens + configs/sd3.yaml's max_sequence_length
    per_evaluation = flops_per_evaluation(layers, resolution, text_tokens, cfg=True)
    peak = peak_flops(out["machine"].get("gpu", "")) if not args.cpu else None
    for name, result in runs.items():
        result["rollout_nfe_per_second"] = result["nfe_per_image"] * result["images"] / result["phases"]["rollout"]
        flops = step_flops(result, per_evaluation, window, kl=True, checkpointing=True)
        result["model_flops"] = flops
        result["mfu"] = flops / result["seconds"] / peak if peak else None
    if "tp_eager" in runs and "flow_grpo_eager" in runs:
        out["step_time_ratio"] = runs["tp_eager"]["seconds"] / runs["flow_grpo_eager"]["seconds"]
    if "tp_eager" in runs and "tp_compiled" in runs:
        out["compile_speedup"] = runs["tp_eager"]["seconds"] / runs["tp_compiled"]["seconds"]
    out["flops_per_evaluation"] = per_evaluation
    strategies = ("fsdp", "fsdp2") if "strategies" in args.parts else ()
    out["strategies"] = {s: smoke(s, bench.work, device) for s in strategies if within_budget(f"strategy {s}")}
    from tests.helpers.tiny_models import STAND_INS

    families = ["zimage"] if args.cpu else list(STAND_INS)  # on a CPU one shows the code still runs
    families = families if "families" in args.parts else []
    out["families"] = {f: family_smoke(f, bench.work, device) for f in families if within_budget(f"family {f}")}
    out["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    tp = runs.get("tp_eager", {})
    family_codes = " ".join(f"{family}={result['returncode']}" for family, result in out["families"].items())
    print(
        f"gpu check ({out['mode']}): TP-GRPO step {tp.get('seconds', float('nan')):.1f}s, "
        f"TP/Flow {out.get('step_time_ratio', float('nan')):.2f}, "
        f"first-step ratio max {tp.get('update_metrics', {}).get('train/first_ratio_max', float('nan')):.6f}, "
        f"fsdp rc {out['strategies'].get('fsdp', {}).get('returncode')}, fsdp2 rc {out['strategies'].get('fsdp2', {}).get('returncode')}, "
        f"families rc {family_codes}; "
        f"{args.out}"
    )
    return out


if __name__ == "__main__":
    main()
