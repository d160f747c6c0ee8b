"""Write the LoRA of a training checkpoint in the diffusers format.

    python -m tpgrpo.export --ckpt lightning_logs/tpgrpo/version_0/checkpoints/last.ckpt --out my_lora
    python -m tpgrpo.export --ckpt last.ckpt --config configs/tiny.yaml --model.lora.rank=4 --out my_lora

The model is built from the checkpoint's own hyper-parameters, or, with ``--config``, from the
config files and ``--model.*`` overrides (as ``train.py`` would build it). Without ``--config``,
``--model.KEY=VALUE`` overrides single hyper-parameters (e.g. a moved ``pretrained_path``). The
EMA weights are written when the checkpoint holds the state of a `tpgrpo.training.ema.LoRAEMA` callback
(``--no-ema``: the raw weights). The output loads with ``pipe.load_lora_weights(out)``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from tpgrpo.errors import UserInputError
from tpgrpo.lora import save_lora, trainable_parameters

# the settings group that decides the LoRA's shape and meaning: a config must agree with the checkpoint on it
STRUCTURE_GROUP = "lora"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only
    except Exception as error:  # a truncated or foreign file
        raise UserInputError(f"{path}: not a readable checkpoint ({type(error).__name__}: {error})") from None


def ema_weights(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The EMA shadow weights saved by `tpgrpo.training.ema.LoRAEMA` (by parameter name), or None."""
    for key, state in checkpoint.get("callbacks", {}).items():
        if str(key).startswith("LoRAEMA") and isinstance(state, dict) and state.get("shadow"):
            return state["shadow"]
    return None


def build_module(
    checkpoint: dict[str, Any], config: Sequence[str] = (), overrides: Sequence[str] = ()
):
    """The `TPGRPOModule` the checkpoint was trained with (see the module docstring)."""
    from tpgrpo.training.module import TPGRPOModule

    saved = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
    if config:
        from tpgrpo.cli import build_cli

        args = [item for path in config for item in ("--config", str(path))]
        model = build_cli([*args, *overrides, "--trainer.logger=false"], run=False).model
        trained, configured = saved.get(STRUCTURE_GROUP, {}), model.hparams[STRUCTURE_GROUP]
        for key, value in trained.items():
            if configured.get(key) != value:
                raise UserInputError(
                    f"the checkpoint was trained with model.{STRUCTURE_GROUP}.{key}={value!r} but the config "
                    f"gives {configured.get(key)!r}; pass --model.{STRUCTURE_GROUP}.{key}={value}"
                )
        return model
    if not saved:
        raise UserInputError("the checkpoint holds no hyper-parameters: pass the training --config")
    for item in overrides:
        key, sep, value = item.removeprefix("--").partition("=")
        if not sep or not key.startswith("model."):
            raise UserInputError(f"unknown argument {item!r}: use --model.KEY=VALUE (or pass --config)")
        *groups, name = key.removeprefix("model.").split(".")
        target = saved
        for group in groups:
            target = target.get(group) if isinstance(target.get(group), dict) else None
            if target is None:
                raise UserInputError(f"unknown model setting {key.removeprefix('model.')!r}")
        if name not in target:
            raise UserInputError(f"unknown model setting {key.removeprefix('model.')!r}")
        target[name] = yaml.safe_load(value)
    return TPGRPOModule(**saved)


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    config: Sequence[str] = (),
    overrides: Sequence[str] = (),
    use_ema: bool = True,
) -> tuple[Path, bool]:
    """Load ``ckpt`` into the module and write its LoRA to ``out``; returns (out, whether EMA weights were used)."""
    checkpoint = load_checkpoint(ckpt)
    module = build_module(checkpoint, config, overrides)
    module.on_load_checkpoint(checkpoint)  # checks every LoRA weight is there, with the right shape
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    shadow = ema_weights(checkpoint) if use_ema else None
    if shadow is not None:
        params = trainable_parameters(module)
        if not isinstance(shadow, dict) or set(shadow) != set(params) or any(
            shadow[name].shape != p.shape for name, p in params.items()
        ):
            raise UserInputError(f"{ckpt}: the EMA weights do not fit the model's LoRA")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(shadow[name].to(dtype=param.dtype))
    path = save_lora(module.transformer, out, pipeline_class=module.flow.pipeline_class)
    return path, shadow is not None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tpgrpo.export", description=__doc__.split("\n\n")[0],
        epilog="Other arguments (--model.KEY=VALUE, ...) go to the config parser or override hyper-parameters.",
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py fit")
    parser.add_argument("--out", required=True, help="output folder (pytorch_lora_weights.safetensors)")
    parser.add_argument("--config", action="append", default=[], help="training config(s); default: the checkpoint's")
    parser.add_argument("--no-ema", action="store_true", help="write the raw weights even if EMA weights exist")
    args, rest = parser.parse_known_args(argv)
    try:
        path, used_ema = export_checkpoint(args.ckpt, args.out, args.config, rest, use_ema=not args.no_ema)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote the LoRA{' (EMA weights)' if used_ema else ''} of {args.ckpt} to {path}")


if __name__ == "__main__":
    main()
