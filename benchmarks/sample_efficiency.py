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
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tpgrpo.cli import build_cli  # noqa: E402
from tpgrpo.demo import mean_and_stderr  # noqa: E402

METHODS = ("tp", "outcome")


class HeldOutCurve(Callback):
    """Records (optimizer step, training seconds, held-out reward, stderr) after every validation."""

    def __init__(self):
        self.points: list[dict] = []
        self.training_seconds = 0.0
        self._started: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.training_seconds += time.perf_counter() - self._started

    def on_validation_end(self, trainer, pl_module):
        mean, stderr = mean_and_stderr(pl_module.eval_summary["reward"])
        self.points.append(
            {"step": trainer.global_step, "seconds": self.training_seconds, "reward": mean, "stderr": stderr}
        )


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


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for method, colour in zip(METHODS, ("tab:red", "tab:blue")):
        for seed, points in results[method].items():
            label = f"{'TP-GRPO' if method == 'tp' else 'Flow-GRPO'} (seed {seed})"
            for axis, x in zip(axes, ("step", "seconds")):
                axis.errorbar([p[x] for p in points], [p["reward"] for p in points],
                              yerr=[p["stderr"] for p in points], color=colour, alpha=0.8, label=label, capsize=2)
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("training seconds")
    for axis in axes:
        axis.set_ylabel("held-out reward")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


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
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "args": {**vars(args), "extra": extra},
        "base_reward": base,
        "final_reward": final,
        "target": target,
        "steps_to_target": {m: {s: steps_to_reach(p, target) for s, p in results[m].items()} for m in METHODS},
        "curves": results,
    }
    out.write_text(json.dumps(summary, indent=2))
    try:
        plot(results, out.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
    print(
        f"held-out reward {base:.3f} -> TP-GRPO {final['tp']:.3f}, Flow-GRPO {final['outcome']:.3f} after "
        f"{args.steps} optimizer steps ({len(args.seeds)} seeds); steps to {target:.3f}: "
        f"{summary['steps_to_target']}; {out}"
    )


if __name__ == "__main__":
    main()
