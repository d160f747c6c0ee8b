"""LoRA policy helpers over peft, for the diffusers transformers of `tpgrpo.families`.

The policy is the base transformer plus one LoRA adapter; the reference model of the KL term
is the same module with the adapter disabled (`disabled_adapter`), so no weights are copied.
Exports are diffusers-format LoRAs that ``pipe.load_lora_weights(directory)`` reads.

Pass the transformer itself (``flow_model.transformer``), not a DDP wrapper: parameter names
must be the transformer's own. FSDP2 (``fully_shard``) keeps the names and works; its
`lora_state_dict` gathers full tensors, a collective every rank must call.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.distributed.tensor import DTensor

from tpgrpo.errors import UserInputError
from tpgrpo.families import ATTENTION_PROJECTIONS, PIPELINE_FAMILIES  # noqa: F401  (re-exported)

# each family's default LoRA targets (`tpgrpo.families.FlowModel.lora_targets`), by family name
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {cls.family: cls.lora_targets for cls in PIPELINE_FAMILIES.values()}
ADAPTER = "default"


def add_lora(
    transformer: nn.Module,
    rank: int = 32,
    alpha: float = 64,
    target_modules: Sequence[str] | None = None,
    init: str | bool = "gaussian",
    dropout: float = 0.0,
    family: str = "sd3",
) -> list[nn.Parameter]:
    """Add a LoRA adapter to a diffusers transformer in place; return its (trainable) parameters.

    ``target_modules``: module name suffixes to adapt (None: ``DEFAULT_TARGET_MODULES[family]``).
    Base weights end up frozen and only the LoRA weights require grad. LoRA weights are
    float32 whatever the base dtype (peft casts activations at the adapter). ``init``: peft's
    ``init_lora_weights`` ("gaussian": A ~ N(0, 1/rank), B = 0, so the output starts unchanged).
    """
    if rank < 1:
        raise UserInputError(f"LoRA rank must be >= 1, got {rank}")
    if target_modules is None:
        if family not in DEFAULT_TARGET_MODULES:
            known = sorted(DEFAULT_TARGET_MODULES)
            raise UserInputError(f"unknown model family {family!r} for LoRA targets; use one of {known}")
        target_modules = DEFAULT_TARGET_MODULES[family]
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=init,
        lora_dropout=dropout,
    )
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise UserInputError(f"cannot add LoRA to {type(transformer).__name__}: {error}") from error
    params = lora_parameters(transformer)
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    return params


def named_lora_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the LoRA parameters of ``module`` (names containing ``lora_``), in module order."""
    return [(name, param) for name, param in module.named_parameters() if "lora_" in name]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The one rule for what trains (and what EMA, checkpoints and export hold): the LoRA
    parameters of ``module``, by name, in module order."""
    return dict(named_lora_parameters(module))


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters of ``module``, in the order of `named_lora_parameters`."""
    return [param for _, param in named_lora_parameters(module)]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the LoRA weights, keyed as diffusers saves them.

    Keys look like ``transformer_blocks.0.attn.to_q.lora_A.weight`` (no adapter name).
    """
    state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
    return {key: full_tensor(value).detach().cpu().clone() for key, value in state.items()}


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@contextmanager
def disabled_adapter(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``module`` computes the base model's output (the KL reference).

    Works through wrappers (it switches every peft layer inside ``module``); the
    requires_grad flags of the LoRA weights are restored on exit.
    """
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    flags = [(param, param.requires_grad) for param in lora_parameters(module)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield module
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for param, flag in flags:
            param.requires_grad_(flag)


def save_lora(
    module: nn.Module,
    directory: str | Path,
    pipeline_class: type[DiffusionPipeline] = StableDiffusion3Pipeline,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the LoRA of ``module`` as ``directory/pytorch_lora_weights.safetensors``.

    Diffusers format with the adapter config (rank, alpha, targets) as metadata, so
    ``pipeline_class.from_pretrained(...).load_lora_weights(directory)`` restores it exactly.
    ``state``: the weights from `lora_state_dict`, when taken already (under FSDP2 every rank
    must take them, then one rank saves).
    """
    directory = Path(directory)
    pipeline_class.save_lora_weights(
        directory,
        transformer_lora_layers=lora_state_dict(module) if state is None else state,
        transformer_lora_adapter_metadata=module.peft_config[ADAPTER].to_dict(),
    )
    return directory


def load_lora(
    module: nn.Module,
    directory: str | Path,
    pipeline_class: type[DiffusionPipeline] = StableDiffusion3Pipeline,
) -> None:
    """Load a LoRA written by `save_lora` into the adapter that `add_lora` put on ``module``.

    The adapter must have the same rank and targets; any mismatch is an error.
    """
    directory = Path(directory)
    try:
        state = pipeline_class.lora_state_dict(directory)
    except (OSError, ValueError) as error:
        raise UserInputError(f"cannot read a LoRA from {directory}: {error}") from error
    prefix = "transformer."
    state = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
    try:
        result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
    except RuntimeError as error:  # size mismatch: a different rank; the last line names one
        reason = str(error).strip().splitlines()[-1].strip()
        raise UserInputError(f"the LoRA in {directory} does not fit this model: {reason}") from error
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing or not state:
        raise UserInputError(
            f"the LoRA in {directory} does not fit this model: {len(result.unexpected_keys)} unexpected and "
            f"{len(missing)} missing LoRA weights (e.g. {(result.unexpected_keys or missing or ['no weights'])[0]})"
        )


def trainable_state(state_dict: Mapping[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of a checkpoint's ``state_dict`` that are ``module``'s trainable (LoRA) weights:
    the frozen base comes from the pretrained model, not from checkpoints."""
    trainable = set(trainable_parameters(module))
    return {key: value for key, value in state_dict.items() if key in trainable}


def check_checkpoint_fits(saved: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """One-line error unless the checkpoint's LoRA weights ``saved`` are exactly ``module``'s, in shape."""
    own = trainable_parameters(module)
    missing = sorted(set(own) - set(saved))
    wrong = [(k, tuple(saved[k].shape), tuple(p.shape)) for k, p in own.items() if k in saved and saved[k].shape != p.shape]
    if missing or wrong:
        detail = f"{len(missing)} LoRA weights missing (e.g. {missing[0]})" if missing else (
            f"{wrong[0][0]} has shape {wrong[0][1]}, the model {wrong[0][2]}"
        )
        raise UserInputError(
            f"the checkpoint does not fit this model: {detail}; use the model settings it was trained "
            "with (lora_rank, lora_targets, pretrained_path)"
        )
