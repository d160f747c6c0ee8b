"""The LightningCLI of the project; `train.py` and `tpgrpo.demo` are thin wrappers around it."""
from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from tpgrpo.callbacks import find_last_checkpoint
from tpgrpo.data import PromptDataModule
from tpgrpo.errors import UserInputError
from tpgrpo.module import TPGRPOModule
from tpgrpo.settings import check_model_settings

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


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
    """LightningCLI with the checks that need both the model's and the data's settings."""

    def _parse_ckpt_path(self) -> None:
        """Keep the settings of the config and command line when ``--ckpt_path`` is given.

        Lightning would replace every ``model.*`` setting with the checkpoint's, silently dropping
        overrides such as ``--model.evaluation.predict_dir`` or a new learning rate. Here the checkpoint
        supplies weights and training state only; a LoRA that does not fit the configured model
        is a clear error (`TPGRPOModule.on_load_checkpoint`).
        """

    def parse_arguments(self, parser, args) -> None:
        """Range-check the model's settings before ``--print_config`` prints them (and exits)."""
        arguments = sys.argv[1:] if args is None else list(args)
        if any(str(a).startswith("--print_config") for a in arguments):
            plain = [a for a in arguments if not str(a).startswith("--print_config")]
            config = parser.parse_args(plain)
            subcommand = config.get("subcommand")
            check_model_settings((config[subcommand] if subcommand else config).model)
        super().parse_arguments(parser, args)

    def before_fit(self) -> None:
        check_model_and_data(self.model, self.datamodule)

    def fit(self, model: TPGRPOModule, ckpt_path: str | None = None, **kwargs) -> None:
        """``--ckpt_path last``: the newest last checkpoint of any logger version of this run (see
        `tpgrpo.callbacks.find_last_checkpoint`); none found: a warning, and training starts afresh."""
        if ckpt_path == "last":
            ckpt_path = find_last_checkpoint(self.trainer)
            if ckpt_path is None:
                rank_zero_warn("--ckpt_path last: no last checkpoint of this run was found; training starts from scratch")
            else:
                rank_zero_info(f"--ckpt_path last: resuming from {ckpt_path}")
        self.trainer.fit(model, ckpt_path=ckpt_path, **kwargs)


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
    return TPGRPOCLI(
        TPGRPOModule,
        PromptDataModule,
        parser_kwargs=_parser_kwargs(run, exit_on_error),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


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
    """The known setting a misspelt or ungrouped key most likely means (``model.noise_level`` ->
    ``model.sampling.noise_level``), or None."""
    known = _known_keys()
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    prefix, _, name = key.partition(".")
    by_name = {k.rsplit(".", 1)[-1]: k for k in known if k.startswith(f"{prefix}.")}
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(by_name), n=1, cutoff=0.8)
    return by_name[close[0]] if close else None


def main(args: list[str] | None = None) -> None:
    """Run the CLI; input errors end the program with one line on stderr and exit status 2."""
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        build_cli(args, exit_on_error=False)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except ArgumentError as error:
        print(f"error: {_one_line(str(error))}", file=sys.stderr)
        sys.exit(2)
