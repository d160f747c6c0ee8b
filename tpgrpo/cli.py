"""The LightningCLI of the project; `train.py` and `tpgrpo.demo` are thin wrappers around it."""
from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from tpgrpo.data import PromptDataModule
from tpgrpo.errors import UserInputError
from tpgrpo.module import TPGRPOModule

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _parser_kwargs(run: bool) -> dict:
    """omegaconf mode (``${model.num_steps}`` interpolation) and the shared base config under every config.

    With subcommands (``run``) the base config belongs to each subcommand's parser, not the main one.
    """
    common = {"parser_mode": "omegaconf", "default_config_files": [str(BASE_CONFIG)]}
    if not run:
        return common
    return {"parser_mode": "omegaconf", **{name: dict(common) for name in SUBCOMMANDS}}


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Parse ``args`` (default: ``sys.argv``); with ``run`` execute the subcommand."""
    return LightningCLI(
        TPGRPOModule,
        PromptDataModule,
        parser_kwargs=_parser_kwargs(run),
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Run the CLI; input errors end the program with one line on stderr and exit status 2."""
    try:
        build_cli(args)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
