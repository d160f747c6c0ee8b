"""Checkpointing and LoRA export callbacks.

`AtomicCheckpoint`: a `ModelCheckpoint` whose files are written next to their final name and
moved into place with ``os.replace``, so a crash (kill -9, preemption, full disk) while saving
leaves the previous checkpoint intact. It also fixes what the stock callback gets wrong for this
project (manual optimisation, several optimizer steps per training batch):

- ``every_n_train_steps`` saves whenever a batch crosses a multiple of N optimizer steps (the
  stock callback saves only when ``global_step % N == 0`` after a batch, which steps of 2 jump over);
- ``--ckpt_path last`` finds the newest ``last.ckpt`` of every version of the experiment (the
  stock callback looks only in the folder of the *new* run's logger version, which holds none,
  and silently starts from scratch);
- a save due at a batch that validation follows is made after that validation, and the loggers
  are flushed first, so a run resumed from any checkpoint logs exactly what an uninterrupted run logs.

`LoRAExport`: writes the LoRA (EMA weights when the `tpgrpo.training.ema.LoRAEMA` callback is present) in
the diffusers format to ``<log_dir>/lora`` at the end of `fit` and, optionally, every N steps.

`ImageGrids`: rollout and evaluation image grids with their rewards and prompts in TensorBoard.

`ProgressBar`: Lightning's progress bar without the epoch total a run bounded by ``max_steps``
does not have (Lightning's rich bar shows "Epoch 1/-2" for ``max_epochs: -1``).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any
from weakref import proxy

from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ModelCheckpoint, RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.utilities import rank_zero_info

from tpgrpo.images import image_grid, save_image
from tpgrpo.lora import lora_state_dict, save_lora
from tpgrpo.training.ema import LoRAEMA

TMP_SUFFIX = ".tmp"


def _fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every OS or filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(source: str, target: str) -> None:
    """Move the finished ``source`` (file or folder) onto ``target`` atomically where possible."""
    if os.path.isdir(source):  # sharded checkpoints are folders: os.replace cannot overwrite a folder
        old = target + ".old"
        if os.path.isdir(old):
            shutil.rmtree(old)
        if os.path.lexists(target):
            os.replace(target, old)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        with open(source, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(source, target)
    _fsync_dir(os.path.dirname(os.path.abspath(target)))


def _last_checkpoints_of_all_versions(trainer: Trainer, callback: ModelCheckpoint) -> set[str]:
    """``<save_dir>/<name>/*/checkpoints/last*.ckpt``: the last checkpoints of every version of the logger's experiment."""
    if not trainer.loggers or not isinstance(callback._fs, LocalFileSystem):
        return set()
    logger = trainer.loggers[0]
    root = Path(logger.save_dir if logger.save_dir is not None else trainer.default_root_dir) / str(logger.name or "")
    pattern = re.compile(rf"^{re.escape(callback.CHECKPOINT_NAME_LAST)}(-(\d+))?$")
    if not root.is_dir():
        return set()
    return {
        os.path.normpath(path)
        for path in root.glob(f"*/checkpoints/*{callback.FILE_EXTENSION}")
        if pattern.match(path.stem) and path.is_file()
    }


def find_last_checkpoint(trainer: Trainer) -> str | None:
    """The newest ``last*.ckpt`` of the trainer's checkpoint callbacks, searching every logger version.

    What ``--ckpt_path last`` should mean for a run whose checkpoints live in the folder of its
    logger's version (``<save_dir>/<name>/version_N/checkpoints``): a new run gets a new version,
    where Lightning's own lookup finds nothing. Works with the stock `ModelCheckpoint` too.
    """
    found: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)
            if getattr(callback, "_follows_logger", callback.dirpath is None):
                found |= _last_checkpoints_of_all_versions(trainer, callback)
    existing = [path for path in found if os.path.isfile(path)]
    return max(existing, key=os.path.getmtime) if existing else None


def crossed_multiple(before: int, after: int, every: int) -> bool:
    """Whether a batch that took the step count from ``before`` to ``after`` passed a multiple of
    ``every`` (never for ``every`` < 1): a batch takes several optimizer steps, so ``after % every
    == 0`` would miss multiples it jumped over."""
    return every >= 1 and after // every > before // every


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class AtomicCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` with crash-safe writes, step counting that fits several optimizer steps per
    batch, and a clean stop when the run is told to stop.

    Takes the arguments of `lightning.pytorch.callbacks.ModelCheckpoint`. What a checkpoint holds
    is decided by the module (`TPGRPOModule.on_save_checkpoint`: the LoRA weights and training
    state, never the frozen base model). SIGTERM, or SIGUSR1 as SLURM sends it before a time limit
    (``#SBATCH --signal=USR1@120``), makes the run write its last checkpoint at the next batch
    boundary (after the validation that follows that batch, if any) and stop; ``fit --ckpt_path
    last`` continues it exactly.
    """

    _step_before_batch: int = 0
    _stop_signal: int | None = None
    _stopping: bool = False

    # ------------------------------------------------------------------------ stop signals
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previous_handlers = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in STOP_SIGNALS:
                self._previous_handlers[number] = signal.signal(number, self._request_stop)

    def _request_stop(self, number: int, frame: Any) -> None:
        self._stop_signal = number

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for number, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(number, handler)
        self._previous_handlers = {}

    def _stop_requested(self, trainer: Trainer) -> bool:
        """Whether any rank was told to stop (every rank asks at every batch end, so all agree)."""
        return bool(trainer.strategy.reduce_boolean_decision(self._stop_signal is not None, all=False))

    def _stop(self, trainer: Trainer) -> None:
        name = signal.Signals(self._stop_signal).name if self._stop_signal is not None else "a stop signal"
        rank_zero_info(f"{name} received: the last checkpoint is written at step {trainer.global_step}; "
                       "continue with `fit --ckpt_path last`")
        trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._stopping:
            self._stop(trainer)

    # ------------------------------------------------------------------------ atomic writes
    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if not isinstance(self._fs, LocalFileSystem):  # remote stores: fsspec's own transaction
            return super()._save_checkpoint(trainer, filepath)
        for logger in trainer.loggers:  # what was logged up to this checkpoint is on disk too (no-op off rank 0)
            logger.save()
        temporary = filepath + TMP_SUFFIX
        trainer.save_checkpoint(temporary, self.save_weights_only)
        if trainer.is_global_zero and os.path.lexists(temporary):
            _replace(temporary, filepath)
        trainer.strategy.barrier("AtomicCheckpoint._save_checkpoint")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    # ------------------------------------------------------- every_n_train_steps, manual optimisation
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.automatic_optimization:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._stop_requested(trainer):
            self._stopping = True
            candidates = self._monitor_candidates(trainer)
            if self._validation_follows(trainer):
                self._defer_save_until_validation = True  # saved, then stopped, in on_validation_end
            else:
                self._save_last_checkpoint(trainer, candidates)
                self._stop(trainer)
            return
        every = self._every_n_train_steps
        due = crossed_multiple(self._step_before_batch, trainer.global_step, every)
        interval = self._train_time_interval
        if interval is not None:
            now = time.monotonic()
            last = self._last_time_checked
            time_due = trainer.strategy.broadcast(last is not None and now - last >= interval.total_seconds())
            if time_due or last is None:
                self._last_time_checked = now
            due = due or time_due
        if not due or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        if (self.monitor is not None and self.monitor not in candidates) or self._validation_follows(trainer):
            self._defer_save_until_validation = True  # saved in on_validation_end
            return
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)

    def _validation_follows(self, trainer: Trainer) -> bool:
        """Whether validation runs right after this batch (and `on_validation_end` then saves).

        Saving after it keeps validation metrics exact on resume: Lightning does not repeat the
        validation that follows a batch whose end-of-batch checkpoint it resumes from, so a run
        killed during that validation would never log it.
        """
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is None or not trainer.enable_validation or self._should_save_on_train_epoch_end(trainer):
            return False
        batches = getattr(trainer.fit_loop.epoch_loop.val_loop, "max_batches", None)
        if not isinstance(batches, list) or sum(batches) == 0:  # no validation data: validation is skipped
            return False
        try:
            return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(fetcher))
        except Exception:  # a Lightning version without this helper: save now
            return False

    # ------------------------------------------------------------------- --ckpt_path last
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._follows_logger = getattr(self, "_follows_logger", self.dirpath is None)
        super().setup(trainer, pl_module, stage)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:
        """``last*.ckpt`` of this callback's folder and, if that follows the logger's version, of every version."""
        found = super()._find_last_checkpoints(trainer)
        if getattr(self, "_follows_logger", self.dirpath is None):
            found |= _last_checkpoints_of_all_versions(trainer, self)
        return found

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if getattr(self, "_follows_logger", self.dirpath is None) and state_dict.get("dirpath") != self.dirpath:
            # resumed into a new logger version: the old folder's bookkeeping does not apply (no warning)
            self.best_model_path = state_dict["best_model_path"]
            return
        super().load_state_dict(state_dict)


class LoRAExport(Callback):
    """Write the LoRA in the diffusers format (``pipe.load_lora_weights(dir)`` reads it).

    Args:
        dirname: folder under the trainer's ``log_dir`` (an absolute path is used as is).
        every_n_train_steps: also export whenever training crosses a multiple of this many
            optimizer steps (0: only at the end of `fit`). Each export replaces the previous one.
        use_ema: export the EMA weights when a `tpgrpo.training.ema.LoRAEMA` callback is present.
    """

    def __init__(self, dirname: str = "lora", every_n_train_steps: int = 0, use_ema: bool = True):
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.dirname = dirname
        self.every_n_train_steps = every_n_train_steps
        self.use_ema = use_ema
        self.last_export: Path | None = None
        self._step_before_batch = 0

    def directory(self, trainer: Trainer) -> Path:
        path = Path(self.dirname)
        if path.is_absolute():
            return path
        return Path(trainer.log_dir or trainer.default_root_dir) / path

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if crossed_multiple(self._step_before_batch, trainer.global_step, self.every_n_train_steps):
            self.export(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step > 0:
            self.export(trainer, pl_module)

    def export(self, trainer: Trainer, pl_module: LightningModule) -> Path:
        """Write the LoRA (rank 0 writes; every rank takes part, since sharded weights are gathered) and return the folder."""
        target = self.directory(trainer)
        ema = next((c for c in trainer.callbacks if isinstance(c, LoRAEMA)), None) if self.use_ema else None
        with ema.swapped_in(pl_module) if ema is not None else nullcontext():
            state = lora_state_dict(pl_module.transformer)
        if trainer.is_global_zero:
            staging = target.with_name(target.name + TMP_SUFFIX)
            if staging.exists():
                shutil.rmtree(staging)
            save_lora(pl_module.transformer, staging, pipeline_class=pl_module.flow.pipeline_class, state=state)
            _replace(str(staging), str(target))
            rank_zero_info(
                f"LoRA{' (EMA)' if ema is not None else ''} at step {trainer.global_step} written to {target}"
            )
        trainer.strategy.barrier("LoRAExport.export")
        self.last_export = target
        return target


class PNGWriter(BasePredictionWriter):
    """Writes ``predict``'s images as ``<folder>/<prompt index>_seed<seed>.png`` after each batch.

    Reads the dictionary the module's ``predict_step`` returns (``images``, ``index``, ``seeds``,
    ``real``; padding rows are skipped), replaces its images by the written paths, so a long
    ``predict`` does not hold every image in memory.
    """

    def __init__(self, folder: str | Path):
        super().__init__(write_interval="batch")
        self.folder = Path(folder)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for image, index, seed, real in zip(prediction["images"], prediction["index"], prediction["seeds"], prediction["real"]):
            if real:
                path = self.folder / f"{int(index):05d}_seed{int(seed)}.png"
                save_image(image, path)
                paths.append(str(path))
        prediction["images"] = None
        prediction["paths"] = paths


class ImageGrids(Callback):
    """Image grids in TensorBoard: rollout images while training, samples at each evaluation.

    Reads what the module's steps return (``images``, ``rewards``, ``prompts``, ``scores``); each
    grid comes with a text of each image's reward and prompt.

    Args:
        every_n_train_steps: log the last rollout batch's main images whenever training crosses
            a multiple of this many optimizer steps (0: never).
        eval_images: log the first evaluation batch's samples at every validation and test.
        count: most images per grid.
    """

    def __init__(self, every_n_train_steps: int = 50, eval_images: bool = True, count: int = 16):
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: never), got {every_n_train_steps}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.every_n_train_steps = every_n_train_steps
        self.eval_images = eval_images
        self.count = count
        self._step_before_batch = 0

    def log_grid(self, trainer: Trainer, tag: str, images: Any, rewards: Any, prompts: list[str] | None = None) -> None:
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image") or images is None or not len(images):
            return
        count = min(self.count, images.shape[0])
        experiment.add_image(tag, image_grid(images[:count].float().cpu()), trainer.global_step)
        captions = [f"{i}: {float(r):.3f}" + (f" {prompts[i]}" if prompts else "") for i, r in enumerate(rewards[:count])]
        experiment.add_text(f"{tag}_captions", "  \n".join(captions), trainer.global_step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not outputs or not crossed_multiple(self._step_before_batch, trainer.global_step, self.every_n_train_steps):
            return
        prompts = batch.get("prompts") if isinstance(batch, dict) else None
        self.log_grid(trainer, "train/samples", outputs.get("images"), outputs["rewards"][:, -1], prompts)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.eval_images and batch_idx == 0 and not trainer.sanity_checking and outputs and outputs["scores"]:
            stage = "test" if trainer.testing else "val"
            self.log_grid(trainer, f"{stage}/samples", outputs["images"], outputs["scores"]["reward"], outputs["prompts"])

    on_test_batch_end = on_validation_batch_end


def epoch_description(epoch: int, max_epochs: int | None) -> str:
    """``"Epoch 3/9"`` for a run of 10 epochs; ``"Epoch 3"`` when the epochs are unbounded
    (``max_epochs`` None or -1: training ends at ``max_steps``)."""
    if max_epochs is None or max_epochs < 1:
        return f"Epoch {epoch}"
    return f"Epoch {epoch}/{max_epochs - 1}"


if _RICH_AVAILABLE:

    class ProgressBar(RichProgressBar):
        """`RichProgressBar` whose training description is `epoch_description`. Takes its arguments."""

        def _get_train_description(self, current_epoch: int) -> str:
            description = epoch_description(current_epoch, self.trainer.max_epochs)
            width = len(self.validation_description)  # as Lightning: no flicker between the two bars
            return f"{description:{width}}" if width > len(description) else description

else:  # without rich, Lightning's default bar (its description has no epoch total)

    class ProgressBar(TQDMProgressBar):  # type: ignore[no-redef]
        """`TQDMProgressBar` (its training description is ``"Epoch N"``). Takes its arguments."""
