"""Held-out reward during training: a callback that records it and a plot of it."""
from __future__ import annotations

import time
from pathlib import Path

from tpgrpo.training.evaluation import EvalResults, mean_and_stderr

ALGORITHM_LABELS = {"tp-grpo": "TP-GRPO", "flow-grpo": "Flow-GRPO", "diffusion-nft": "DiffusionNFT"}


class HeldOutCurve(EvalResults):
    """`EvalResults` that also records ``{"step", "seconds", "reward", "stderr"}`` after every validation.

    ``step`` is the optimizer step, ``seconds`` the time spent in training batches so far
    (evaluation excluded), ``reward`` the mean held-out reward of that validation (this rank's images).
    """

    def __init__(self):
        super().__init__()
        self.points: list[dict] = []
        self.training_seconds = 0.0
        self._started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.training_seconds += time.perf_counter() - self._started

    def on_validation_epoch_end(self, trainer, pl_module):
        finished = self._current
        super().on_validation_epoch_end(trainer, pl_module)
        if finished is None or "reward" not in finished.scores:
            return
        mean, stderr = mean_and_stderr(finished.scores["reward"])
        self.points.append({"step": trainer.global_step, "seconds": self.training_seconds, "reward": mean, "stderr": stderr})


def plot_curves(curves: dict[str, list[dict]], path: str | Path, x: tuple[str, ...] = ("step",)) -> None:
    """Held-out reward with standard-error bars against each of ``x`` ("step", "seconds"), one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(x), figsize=(4.5 * len(x), 3.2), squeeze=False)
    for axis, key in zip(axes[0], x):
        for label, points in curves.items():
            axis.errorbar([p[key] for p in points], [p["reward"] for p in points], yerr=[p["stderr"] for p in points],
                          label=label, capsize=2, marker="o", markersize=3)
        axis.set_xlabel({"step": "optimizer steps", "seconds": "training seconds"}.get(key, key))
        axis.set_ylabel("held-out reward")
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
