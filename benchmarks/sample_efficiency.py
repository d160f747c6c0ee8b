"""TP-GRPO, Flow-GRPO and DiffusionNFT on the shapes task: held-out reward per step and second.

    python benchmarks/sample_efficiency.py [--steps 40] [--seeds 0 1 2] [--eval-every 10] [--methods ...] [-- extra CLI overrides]

All algorithms (``model.algorithm``) train the same model from the same config (default ``configs/tiny.yaml``) for the
same number of optimizer steps with each seed; the held-out reward (deterministic ODE samples,
fixed seeds) is measured before training and every ``--eval-every`` rollout batches. Writes
``benchmarks/results/sample_efficiency.json`` and ``.png`` (reward against steps and against
wall-clock seconds) and prints one summary line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rollout import machine  # noqa: E402
from tpgrpo.cli import build_cli  # noqa: E402
from tpgrpo.curves import ALGORITHM_LABELS, HeldOutCurve, plot_curves  # noqa: E402

METHODS = ("tp-grpo", "flow-grpo", "diffusion-nft")


def run_one(config: str, method: str, seed: int, steps: int, eval_every: int, extra: list[str]) -> list[dict]:
    curve = HeldOutCurve()
    cli = build_cli(
        [
            "--config", config,
            f"--model.algorithm={method}",
            f"--model.seed={seed}",
            f"--data.seed={seed}",
            f"--seed_everything={seed}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={eval_every}",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
            "--export=null",  # the curves are what this measures; no LoRA files
            *extra,
        ],
        run=False,
    )
    cli.trainer.callbacks.append(curve)
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return curve.points


def steps_to_reach(points: list[dict], target: float) -> int | None:
    return next((p["step"] for p in points if p["reward"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="algorithms to run")
    parser.add_argument("--eval-every", type=int, default=10, help="rollout batches between evaluations")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sample_efficiency.json"))
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]

    results = {method: {} for method in args.methods}
    for method in args.methods:
        for seed in args.seeds:
            results[method][seed] = run_one(args.config, method, seed, args.steps, args.eval_every, extra)

    summary = {
        "machine": machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "args": {**vars(args), "extra": extra},
        **summarize(results),
        "curves": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    try:
        curves = {f"{ALGORITHM_LABELS[m]} (seed {seed})": points for m in results for seed, points in results[m].items()}
        plot_curves(curves, out.with_suffix(".png"), x=("step", "seconds"))
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    print(f"{summary_line(summary)}; {out}")


def summarize(results: dict[str, dict[int, list[dict]]]) -> dict:
    """Seed-averaged base and final held-out reward per method, and the steps each seed took to
    cover half of the best method's rise (None when no method rose above the base)."""
    first = next(iter(results.values()))
    seeds = len(first)
    base = sum(points[0]["reward"] for points in first.values()) / seeds  # the same model before training
    final = {m: sum(p[-1]["reward"] for p in results[m].values()) / seeds for m in results}
    best = max(final.values())
    target = base + 0.5 * (best - base) if best > base else None
    reach = {m: {s: steps_to_reach(p[1:], target) if target else None for s, p in results[m].items()} for m in results}
    return {"base_reward": base, "final_reward": final, "target": target, "steps_to_target": reach}


def summary_line(summary: dict) -> str:
    final, steps = summary["final_reward"], summary["args"]["steps"]
    reached = ", ".join(f"{ALGORITHM_LABELS[m]} {value:.3f}" for m, value in final.items())
    line = (f"held-out reward {summary['base_reward']:.3f} -> {reached} after {steps} optimizer steps "
            f"({len(summary['args']['seeds'])} seeds)")
    if summary["target"] is None:
        return line + "; neither method rose above the base"
    return line + f"; steps to {summary['target']:.3f}: {summary['steps_to_target']}"

if __name__ == "__main__":
    main()
