"""The demo behind ``make demo``: evaluate, train, evaluate again, and show the difference.

    python -m tpgrpo.demo --config configs/tiny.yaml [any train.py override]

It uses the same CLI and config as ``train.py fit``. Before and after training it samples the
held-out prompts (``data.val_prompts``) with fixed seeds, prints the mean reward with its
standard error, and writes ``before_after.png`` (the same prompts and seeds before and after, each column captioned with its prompt),
``reward_curve.png`` (held-out reward at every validation) and ``demo.json`` into ``--out``
(default ``outputs/demo``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from tpgrpo.cli import build_cli
from tpgrpo.curves import ALGORITHM_LABELS, HeldOutCurve, plot_curves
from tpgrpo.errors import UserInputError
from tpgrpo.images import captioned_grid
from tpgrpo.training.evaluation import EvalResults, mean_and_stderr


def _evaluate(cli, results: EvalResults) -> tuple[dict[str, tuple[float, float]], torch.Tensor]:
    """Held-out scores (mean, stderr) and the per-image total rewards, in a fixed order."""
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
    result = results.latest("val")
    return result.summary(), result.scores["reward"]


def _showcase(model, prompts: list[str], seeds: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.sample(prompts, seeds).cpu()


def _format(scores: dict[str, tuple[float, float]]) -> str:
    return ", ".join(f"{key} {mean:.3f} ± {err:.3f}" for key, (mean, err) in sorted(scores.items()))


def in_stderr(change: float, stderr: float) -> float:
    """A change in units of its standard error; 0 for no change, +-inf for a change with no spread."""
    if stderr > 0:
        return change / stderr
    return 0.0 if change == 0 else math.copysign(math.inf, change)


def run(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out", default="outputs/demo")
    known, rest = parser.parse_known_args(argv)
    out = Path(known.out)
    out.mkdir(parents=True, exist_ok=True)

    cli = build_cli(rest, run=False)
    datamodule = cli.datamodule
    datamodule.setup("validate")
    showcase_prompts = list(datamodule.prompt_sets["validate"].prompts[:8])
    showcase_seeds = torch.zeros(len(showcase_prompts), dtype=torch.long)

    curve = HeldOutCurve()
    cli.trainer.callbacks.append(curve)
    started = time.perf_counter()
    before, before_rewards = _evaluate(cli, curve)
    before_images = _showcase(cli.model, showcase_prompts, showcase_seeds)
    print(f"held-out before training: {_format(before)}", flush=True)

    cli.trainer.fit(cli.model, datamodule=datamodule)

    after, after_rewards = _evaluate(cli, curve)
    after_images = _showcase(cli.model, showcase_prompts, showcase_seeds)
    print(f"held-out after training:  {_format(after)}", flush=True)

    grid = captioned_grid(
        torch.cat([before_images, after_images]), len(showcase_prompts), showcase_prompts, scale=4,
        row_labels=["before", "after"],
    )
    grid.save(out / "before_after.png")
    points = list({p["step"]: p for p in curve.points}.values())  # the final evaluation repeats the last one
    algorithm = cli.model.hparams["algorithm"]
    plot_curves({ALGORITHM_LABELS.get(algorithm, algorithm): points}, out / "reward_curve.png")
    mean_before, err_before = before["reward"]
    mean_after, err_after = after["reward"]
    rise_in_stderr = in_stderr(mean_after - mean_before, math.hypot(err_before, err_after))
    # the same prompts and seeds are sampled before and after: the paired difference is sharper
    _, paired_err = mean_and_stderr(after_rewards - before_rewards)
    summary = {
        "before": before,
        "after": after,
        "rise": mean_after - mean_before,
        "rise_in_stderr": rise_in_stderr,
        "paired_stderr": paired_err,
        "rise_in_paired_stderr": in_stderr(mean_after - mean_before, paired_err),
        "train_steps": cli.trainer.global_step,
        "seconds": time.perf_counter() - started,
        "curve": points,
        "showcase_prompts": showcase_prompts,
        "log_dir": cli.trainer.log_dir,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(
        f"reward {mean_before:.3f} ± {err_before:.3f} -> {mean_after:.3f} ± {err_after:.3f} "
        f"({rise_in_stderr:+.1f} standard errors; {summary['rise_in_paired_stderr']:+.1f} paired) "
        f"in {summary['seconds'] / 60:.1f} min; "
        f"grid: {out / 'before_after.png'} (top row before, bottom row after), curve: {out / 'reward_curve.png'}; "
        f"TensorBoard: tensorboard --logdir {cli.trainer.logger.save_dir}"
    )
    return summary


def main() -> None:
    try:
        run(sys.argv[1:])
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
