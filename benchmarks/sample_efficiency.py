"""TP-GRPO against Flow-GRPO (outcome credit) on the shapes task: held-out reward per step and second.

    python benchmarks/sample_efficiency.py [--steps 40] [--seeds 0 1] [--eval-every 10] [-- extra CLI overrides]

Both methods train the same model from the same config (default ``configs/tiny.yaml``) for the
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
from tpgrpo.curves import HeldOutCurve, plot_curves  # noqa: E402

METHODS = ("tp", "outcome")
LABELS = {"tp": "TP-GRPO", "outcome": "Flow-GRPO"}


def run_one(config: str, method: str, seed: int, steps: int, eval_every: int, extra: list[str]) -> list[dict]:
    curve = HeldOutCurve()
    cli = build_cli(
        [
            "--config", config,
            f"--model.credit={method}",
            f"--model.seed={seed}",
            f"--data.seed={seed}",
            f"--seed_everything={seed}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={eval_every}",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            "--trainer.callbacks=[]",
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-every", type=int, default=10, help="rollout batches between evaluations")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sample_efficiency.json"))
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]

    results = {method: {} for method in METHODS}
    for method in METHODS:
        for seed in args.seeds:
            results[method][seed] = run_one(args.config, method, seed, args.steps, args.eval_every, extra)

    base = sum(points[0]["reward"] for points in results["tp"].values()) / len(args.seeds)
    final = {m: sum(p[-1]["reward"] for p in results[m].values()) / len(args.seeds) for m in METHODS}
    target = base + 0.5 * (max(final.values()) - base)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "args": {**vars(args), "extra": extra},
        "base_reward": base,
        "final_reward": final,
        "target": target,
        "steps_to_target": {m: {s: steps_to_reach(p, target) for s, p in results[m].items()} for m in METHODS},
        "curves": results,
    }
    out.write_text(json.dumps(summary, indent=2))
    try:
        curves = {f"{LABELS[m]} (seed {seed})": points for m in METHODS for seed, points in results[m].items()}
        plot_curves(curves, out.with_suffix(".png"), x=("step", "seconds"))
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    print(
        f"held-out reward {base:.3f} -> TP-GRPO {final['tp']:.3f}, Flow-GRPO {final['outcome']:.3f} after "
        f"{args.steps} optimizer steps ({len(args.seeds)} seeds); steps to {target:.3f}: "
        f"{summary['steps_to_target']}; {out}"
    )


if __name__ == "__main__":
    main()
