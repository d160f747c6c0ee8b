"""The LightningCLI of the project; `train.py` and `tpgrpo.demo` are thin wrappers around it."""
from __future__ import annotations

import difflib
import inspect
import json
import re
import sys
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# ------------------------------------------------------------------------------- known noise
from tpgrpo import TORCHVISION_FILTER  # noqa: E402,F401  (installed on import of the package)

# Warnings that are expected and say nothing about a run:
# - modules in eval mode when training starts: the frozen text encoders and VAE stay in it and
#   `TPGRPOModule` switches its transformer itself; Lightning warns of them at every `fit`;
# - Lightning's own use of a `torch.utils._pytree` name that newer torch deprecates.
QUIET_WARNINGS: tuple[str, ...] = (
    r"Found \d+ module\(s\) in eval mode at the start of training",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)


def quiet_known_warnings() -> None:
    """Ignore the warnings of `QUIET_WARNINGS` (by their exact message)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


from tpgrpo.errors import UserInputError  # noqa: E402
from tpgrpo.settings import check_model_settings  # noqa: E402
from tpgrpo.training.callbacks import AtomicCheckpoint, ImageGrids, LoRAExport, ProgressBar, find_last_checkpoint  # noqa: E402
from tpgrpo.training.data import PromptDataModule  # noqa: E402
from tpgrpo.training.ema import LoRAEMA  # noqa: E402
from tpgrpo.training.module import TPGRPOModule  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent  # the repository in a checkout; site-packages once installed
CONFIG_DIR = PACKAGE_DIR / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")

# The callbacks every run has (set in base.yaml), each under its own key: tuned with
# ``--ema.decay 0.5`` or ``checkpoint: {every_n_train_steps: 40}``, removed with ``--ema null``;
# `trainer.callbacks` adds others. A callback of the same kind in `trainer.callbacks` replaces the
# base one (``kind``: the class it is checked against).
BASE_CALLBACKS: dict[str, tuple[type[Callback], type[Callback]]] = {
    "ema": (LoRAEMA, LoRAEMA),
    "checkpoint": (AtomicCheckpoint, ModelCheckpoint),
    "export": (LoRAExport, LoRAExport),
    "lr_monitor": (LearningRateMonitor, LearningRateMonitor),
    "progress_bar": (ProgressBar, LightningProgressBar),
    "images": (ImageGrids, ImageGrids),
}
# Paths inside configs that `resolve_config_paths` looks up outside the working directory.
PATH_KEYS: tuple[str, ...] = (
    "model.pretrained_path",
    "data.train_prompts",
    "data.val_prompts",
    "data.test_prompts",
    "data.predict_prompts",
)
# ``--ckpt_path`` values that name no file (Lightning's, and ours: ``last`` of any version).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _parser_kwargs(run: bool, exit_on_error: bool = True) -> dict:
    """omegaconf mode (``${model.sampling.num_steps}`` interpolation) and the shared base config under every config.

    With subcommands (``run``) the base config belongs to each subcommand's parser, not the main one.
    ``exit_on_error=False``: parse errors raise `jsonargparse.ArgumentError` instead of exiting.
    """
    common = {"parser_mode": "omegaconf", "default_config_files": [str(BASE_CONFIG)], "exit_on_error": exit_on_error}
    if not run:
        return common
    return {"parser_mode": "omegaconf", "exit_on_error": exit_on_error, **{name: dict(common) for name in SUBCOMMANDS}}


class TPGRPOCLI(LightningCLI):
    """LightningCLI with the base callbacks, the checks that need both the model's and the data's
    settings, config paths found outside the repository and one-line errors for bad checkpoints."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """The base callbacks (`BASE_CALLBACKS`), each under its own key, set in ``base.yaml``;
        ``--ema.decay 0.5`` tunes one, ``--ema null`` removes it."""
        for key, (cls, _) in BASE_CALLBACKS.items():
            parser.add_lightning_class_args(cls, key, subclass_mode=True, required=False)

    def _parse_ckpt_path(self) -> None:
        """Keep the settings of the config and command line when ``--ckpt_path`` is given.

        Lightning would replace every ``model.*`` setting with the checkpoint's, silently dropping
        overrides such as ``--model.evaluation.predict_dir`` or a new learning rate. Here the checkpoint
        supplies weights and training state only; a LoRA that does not fit the configured model
        is a clear error (`TPGRPOModule.on_load_checkpoint`).
        """

    def parse_arguments(self, parser, args) -> None:
        """Merge dotted reward options (`merge_reward_options`) and range-check the model's settings
        before ``--print_config`` prints them (and exits)."""
        arguments = sys.argv[1:] if args is None else list(args)
        merged = merge_reward_options(parser, arguments)
        if merged != arguments:
            arguments = merged
            if args is None:
                sys.argv[1:] = merged
            else:
                args = merged
        if any(str(a).startswith("--print_config") for a in arguments):
            plain = [a for a in arguments if not str(a).startswith("--print_config")]
            config = parser.parse_args(plain)
            subcommand = config.get("subcommand")
            check_model_settings((config[subcommand] if subcommand else config).model)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        """Resolve the config's paths (`resolve_config_paths`) and check ``--ckpt_path`` before any weights load."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        resolve_config_paths(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path is not None:
            check_checkpoint_file(ckpt_path)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """The trainer with the base callbacks that `base_callbacks_to_keep` keeps."""
        return super()._instantiate_trainer(config, base_callbacks_to_keep(config, callbacks))

    def before_fit(self) -> None:
        check_model_and_data(self.model, self.datamodule)

    def fit(self, model: TPGRPOModule, ckpt_path: str | None = None, **kwargs) -> None:
        """``--ckpt_path last``: the newest last checkpoint of any logger version of this run (see
        `tpgrpo.training.callbacks.find_last_checkpoint`); none found: a warning, and training starts afresh."""
        if ckpt_path == "last":
            ckpt_path = find_last_checkpoint(self.trainer)
            if ckpt_path is None:
                rank_zero_warn("--ckpt_path last: no last checkpoint of this run was found; training starts from scratch")
            else:
                check_checkpoint_file(ckpt_path)
                rank_zero_info(f"--ckpt_path last: resuming from {ckpt_path}")
        self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


REWARD_OPTION = re.compile(r"^--model\.rewards\.([\w-]+)\.([\w-]+)(?:=(.*))?$")


def merge_reward_options(parser, args: Sequence[str]) -> list[str]:
    """``args`` with ``--model.rewards.NAME.KEY VALUE`` options merged into the reward's settings.

    A dotted override of a mapping-typed setting replaces the reward's whole entry, dropping the
    options a config gave it (``--model.rewards.ocr.weight 0.5`` would lose ``lang: eng``); here the
    reward mapping the other arguments give is read, each such option is set in its entry (a bare
    weight becomes ``{weight: w}``), and the result is passed as one ``--model.rewards`` at the end.
    """
    args = list(args)
    options, rest, i = [], [], 0
    while i < len(args):
        match = REWARD_OPTION.match(str(args[i]))
        if match and (match.group(3) is not None or i + 1 < len(args)):
            name, key, value = match.group(1), match.group(2), match.group(3)
            if value is None:
                value, i = args[i + 1], i + 1
            options.append((name, key, yaml.safe_load(value)))
        else:
            rest.append(args[i])
        i += 1
    if not options:
        return args
    config = parser.parse_args([a for a in rest if not str(a).startswith("--print_config")])
    subcommand = config.get("subcommand")
    rewards = dict((config[subcommand] if subcommand else config).model.get("rewards") or {})
    for name, key, value in options:
        entry = rewards.get(name)
        entry = {"weight": entry} if isinstance(entry, (int, float)) else dict(entry or {})
        entry[key] = value
        rewards[name] = entry
    return [*rest, f"--model.rewards={json.dumps(rewards)}"]


def base_callbacks_to_keep(trainer_config: dict[str, Any], base: list[Callback]) -> list[Callback]:
    """The base callbacks a trainer gets, given its settings (``trainer_config``, callbacks instantiated).

    One is left out when its key is null (``--ema null``), when ``trainer.callbacks`` holds a
    callback of its kind (that one replaces it), and when the trainer turns its kind off:
    ``enable_checkpointing: false`` (checkpoint), ``enable_progress_bar: false`` (progress bar),
    ``logger: false`` (learning-rate monitor).
    """
    given = trainer_config.get("callbacks") or []
    given = given if isinstance(given, list) else [given]
    off: list[type[Callback]] = []
    if trainer_config.get("enable_checkpointing") is False:
        off.append(ModelCheckpoint)
    if trainer_config.get("enable_progress_bar") is False:
        off.append(LightningProgressBar)
    if trainer_config.get("logger") in (False, []):
        off.append(LearningRateMonitor)
    keep = []
    for callback in base:
        if callback is None:
            continue
        kind = next((k for cls, k in BASE_CALLBACKS.values() if isinstance(callback, cls)), None)
        if kind is not None and (issubclass(kind, tuple(off)) or any(isinstance(c, kind) for c in given)):
            continue
        keep.append(callback)
    return keep


def resolve_path(value: str, roots: Sequence[Path] = (REPO_DIR, PACKAGE_DIR)) -> str:
    """A relative path that does not exist from the working directory, found under ``roots``
    (by default the folder holding the ``tpgrpo`` package, then the package itself); else unchanged.

    So the shipped configs work from any directory, also from an installed copy:
    ``tpgrpo/tiny/model`` is the package's tiny model, ``configs/tiny.yaml`` its config and
    ``data/shapes/train.jsonl`` its prompt set (``data/`` is the package's ``prompt_sets/``, which
    the repository links as ``data``). Absolute paths and URLs are left as they are, and so are hub
    ids (``org/name``) unless a folder of that name exists under a root.
    """
    path = Path(value)
    if not value or "://" in value or path.is_absolute() or path.exists():
        return value
    in_data = len(path.parts) > 1 and path.parts[0] == "data"
    shipped = [PACKAGE_DIR / "prompt_sets" / Path(*path.parts[1:])] if in_data else []
    for candidate in [root / path for root in roots] + shipped:
        if candidate.exists():
            return str(candidate)
    return value


def resolve_config_paths(config: Any) -> None:
    """Apply `resolve_path` in place to the settings of `PATH_KEYS` of a parsed config."""
    for key in PATH_KEYS:
        group, name = key.split(".")
        section = config.get(group)
        value = section.get(name) if section is not None else None
        if isinstance(value, (str, Path)):
            section[name] = resolve_path(str(value))


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config`` file resolved by `resolve_path` (``configs/tiny.yaml`` from anywhere)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = resolve_path(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + resolve_path(arg.split("=", 1)[1])
    return out


def check_checkpoint_file(ckpt_path: str | Path) -> None:
    """``--ckpt_path`` names a checkpoint file that loads with tensors and plain values only.

    A missing file, a file that is not a PyTorch checkpoint (garbage, a plain pickle) or one whose
    pickle needs anything else (an arbitrary object: loading it would run code) is a one-line
    `UserInputError` naming the file; nothing is unpickled beyond what ``weights_only`` allows.
    """
    value = str(ckpt_path)
    if value in SPECIAL_CKPT_PATHS or "://" in value or value.startswith("registry:"):
        return
    path = Path(value)
    if not path.is_file():
        raise UserInputError(f"--ckpt_path {path}: checkpoint not found")
    if not zipfile.is_zipfile(path):
        raise UserInputError(f"--ckpt_path {path}: not a checkpoint (not a file written by torch.save); nothing was loaded")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # a weights-only unpickling error, or a damaged archive
        text = str(error)
        if "Weights only load failed" in text:
            held = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" (it holds {held.group(1)})" if held else ""
            raise UserInputError(
                f"--ckpt_path {path}: refusing to unpickle it{what}: a checkpoint holds only tensors and plain "
                "values; give a checkpoint written by training"
            ) from None
        first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise UserInputError(f"--ckpt_path {path}: not a readable checkpoint ({first})") from None


def check_model_and_data(model: TPGRPOModule, datamodule: PromptDataModule) -> None:
    """Settings of the model that depend on the batch the data module builds."""
    data_h = datamodule.hparams
    images = data_h.prompts_per_step * data_h.group_size
    steps = model.update_config.optimizer_steps_per_batch
    if steps > images:
        raise UserInputError(
            f"model.update.optimizer_steps_per_batch ({steps}) is larger than the images of a "
            f"batch (data.prompts_per_step × data.group_size = {images}): lower it or use more images per batch"
        )


def build_cli(args: list[str] | None = None, run: bool = True, exit_on_error: bool = True) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``); with ``run`` execute the subcommand."""
    quiet_known_warnings()
    return TPGRPOCLI(
        TPGRPOModule,
        PromptDataModule,
        parser_kwargs=_parser_kwargs(run, exit_on_error),
        save_config_kwargs={"overwrite": True},
        args=_with_config_paths_resolved(args),
        run=run,
    )


def _with_config_paths_resolved(args: list[str] | None) -> list[str] | None:
    """`resolve_config_args` on ``args``, or on ``sys.argv`` in place when ``args`` is None (so that
    Lightning still reads the command line itself and does not warn of args given twice)."""
    if args is not None:
        return resolve_config_args(args)
    sys.argv[1:] = resolve_config_args(sys.argv[1:])
    return None


# ---------------------------------------------------------------------------- one-line errors
def _config_paths(args: Sequence[str]) -> list[str]:
    """The values of ``--config`` / ``-c`` in ``args``."""
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(args: Sequence[str]) -> None:
    """Every ``--config`` file exists and is a YAML mapping; else a `UserInputError` naming file, line and column."""
    for value in _config_paths(args):
        path = Path(value)
        if not path.suffix and not path.exists():
            continue  # not a file name (jsonargparse also accepts inline YAML)
        if not path.is_file():
            raise UserInputError(f"{path}: config file not found")
        try:
            content = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserInputError(f"{path}: the config file is not UTF-8 text") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
            if context and context_mark is not None:
                problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
            raise UserInputError(f"{path}: invalid YAML{where}: {problem}; fix the file's syntax") from None
        if content is not None and not isinstance(content, dict):
            raise UserInputError(f"{path}: a config file must be a mapping of settings (model:, data:, trainer:)")


def _known_keys() -> list[str]:
    from dataclasses import fields

    from tpgrpo.settings import GROUPS

    keys = [f"{prefix}.{name}" for prefix, cls in (("model", TPGRPOModule), ("data", PromptDataModule), ("trainer", Trainer))
            for name in inspect.signature(cls.__init__).parameters if name != "self"]
    keys += [f"model.{group}.{field.name}" for group, cls in GROUPS.items() for field in fields(cls)]
    keys += [f"{key}.{name}" for key, (cls, _) in BASE_CALLBACKS.items()
             for name in inspect.signature(cls.__init__).parameters if name not in ("self", "args", "kwargs")]
    return keys + ["seed_everything", "ckpt_path", "optimizer", "lr_scheduler"]


def _one_line(message: str) -> str:
    """A parser message on one line, with a suggestion for a misspelt key."""
    line = re.sub(r"\s*\n\s*", " ", message.strip())
    unknown = re.search(r"(?:does not accept option|unrecognized arguments:)\s*'?(?:--)?([\w.]+)", line, re.IGNORECASE)
    if unknown:
        suggestion = suggest_key(unknown.group(1))
        if suggestion:
            line += f" (did you mean {suggestion}?)"
    return line


def suggest_key(key: str) -> str | None:
    """The known setting a misspelt or ungrouped key most likely means (``model.noise_level``,
    ``modle.noise_level`` -> ``model.sampling.noise_level``), or None."""
    known = _known_keys()
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    prefix, _, name = key.partition(".")
    prefixes = sorted({k.split(".", 1)[0] for k in known})
    prefix = next(iter(difflib.get_close_matches(prefix, prefixes, n=1, cutoff=0.75)), prefix)  # "modle" -> "model"
    by_name = {k.rsplit(".", 1)[-1]: k for k in known if k.startswith(f"{prefix}.")}
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(by_name), n=1, cutoff=0.8)
    return by_name[close[0]] if close else None


def main(args: list[str] | None = None) -> None:
    """Run the CLI; input errors end the program with one line on stderr and exit status 2."""
    try:
        check_config_files(resolve_config_args(sys.argv[1:] if args is None else args))
        build_cli(args, exit_on_error=False)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ArgumentError as error:
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
