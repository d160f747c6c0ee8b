"""Parameter memory per rank of the real pipelines, computed from their architecture configs.

``python -m tpgrpo.memory [--model NAME] [--world-size N] [--lora-rank R]`` prints a
markdown table of GiB per rank for each weights precision (float32, bfloat16) and scale-out
strategy (ddp, fsdp2). Every model is built on the meta device from its family's checkpoint
(`tpgrpo.families.components.Checkpoint`), so
nothing is downloaded and no memory is allocated; the counts are the real modules' counts.

The figures are parameter (and buffer) bytes only: activations, the transient all-gathered
blocks of FSDP2, DDP's gradient buckets, the CUDA context and allocator slack are not included.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from tpgrpo.errors import UserInputError
from tpgrpo.families import PIPELINE_FAMILIES
from tpgrpo.families.components import Checkpoint, Component
from tpgrpo.lora import DEFAULT_TARGET_MODULES
from tpgrpo.settings import parse_dtype

TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2", "text_encoder_3")
# every published checkpoint of every family (each class's own `checkpoints`), by name
CHECKPOINTS: dict[str, tuple[type, Checkpoint]] = {
    checkpoint.name: (cls, checkpoint)
    for cls in PIPELINE_FAMILIES.values()
    for checkpoint in cls.__dict__.get("checkpoints", ())
}
PIPELINES: dict[str, Mapping[str, Component]] = {name: c.components for name, (_, c) in CHECKPOINTS.items()}
HUB_REPOS: dict[str, str] = {name: c.hub_id for name, (_, c) in CHECKPOINTS.items()}
MODEL_FAMILIES: dict[str, str] = {name: cls.family for name, (cls, _) in CHECKPOINTS.items()}  # for the LoRA targets
FAMILY_TITLES: dict[str, str] = {name: c.title for name, (_, c) in CHECKPOINTS.items()}
STRATEGIES: tuple[str, ...] = ("ddp", "fsdp2")
LORA_BYTES_PER_VALUE = 4  # LoRA weights, their gradients and AdamW's moments are float32
ADAM_STATES_PER_WEIGHT = 2  # exp_avg and exp_avg_sq
GIB = 1024**3


def _components(family: str) -> dict[str, Component]:
    if family not in PIPELINES:
        raise UserInputError(f"unknown model {family!r}; use one of {sorted(PIPELINES)}")
    return PIPELINES[family]


@dataclass(frozen=True)
class Size:
    """Element counts of one module: parameters and floating-point buffers.

    Floating buffers (SD3's sin-cos position table) are cast with the weights and stay
    replicated under FSDP2, which shards parameters only. Integer buffers (CLIP's position
    ids, well under a KiB) are left out.
    """

    parameters: int
    floating_buffers: int


def module_size(module: nn.Module) -> Size:
    """The `Size` of ``module`` (works on the meta device: counts come from shapes)."""
    return Size(
        parameters=sum(param.numel() for param in module.parameters()),
        floating_buffers=sum(buf.numel() for buf in module.buffers() if buf.is_floating_point()),
    )


@lru_cache(maxsize=None)
def _sizes(family: str) -> tuple[tuple[str, Size], ...]:
    return tuple((name, module_size(component.build_on_meta())) for name, component in _components(family).items())


def component_sizes(family: str) -> dict[str, Size]:
    """``component name -> Size`` of the real pipeline of ``family`` (a key of `PIPELINES`)."""
    return dict(_sizes(family))


def parameter_counts(family: str) -> dict[str, int]:
    """``component name -> parameter count`` of the real pipeline of ``family`` ("sd3": SD3.5
    Medium, "flux": FLUX.1-dev), each component built on the meta device from its config."""
    return {name: size.parameters for name, size in component_sizes(family).items()}


def is_lora_target(module_name: str, targets: Sequence[str]) -> bool:
    """Whether peft adapts the module called ``module_name`` for a list of ``targets``: the
    name equals a target or ends with ``"." + target``."""
    return any(module_name == target or module_name.endswith("." + target) for target in targets)


def lora_parameter_count_of(module: nn.Module, rank: int, targets: Sequence[str]) -> int:
    """LoRA parameters a rank-``rank`` adapter on ``targets`` adds to ``module``.

    Each adapted ``nn.Linear(in, out)`` gets ``A: rank x in`` and ``B: out x rank`` (no
    biases), so ``(in + out) * rank``. Only linear layers are counted: the project's targets
    are attention projections.
    """
    return sum(
        (layer.in_features + layer.out_features) * rank
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear) and is_lora_target(name, targets)
    )


@lru_cache(maxsize=None)
def _lora_parameter_count(family: str, rank: int, targets: tuple[str, ...]) -> int:
    transformer = _components(family)["transformer"].build_on_meta()
    return lora_parameter_count_of(transformer, rank, targets)


def lora_parameter_count(family: str, rank: int, targets: Sequence[str] | None = None) -> int:
    """LoRA parameters of the real transformer of ``family`` at ``rank``; ``targets`` default
    to `tpgrpo.lora.DEFAULT_TARGET_MODULES` (what `tpgrpo.lora.add_lora` adapts)."""
    if rank < 1:
        raise UserInputError(f"LoRA rank must be >= 1, got {rank}")
    _components(family)
    targets = DEFAULT_TARGET_MODULES[MODEL_FAMILIES[family]] if targets is None else targets
    return _lora_parameter_count(family, rank, tuple(targets))


def _per_rank(total_bytes: int, shards: int) -> int:
    """Bytes one rank holds of ``total_bytes`` split evenly over ``shards`` (rounded up)."""
    return math.ceil(total_bytes / shards)


def memory_table(
    family: str,
    weights_dtype: str | torch.dtype = "bfloat16",
    strategy: str = "ddp",
    world_size: int = 1,
    lora_rank: int = 32,
    text_encoders_on_device: bool = True,
) -> dict[str, int]:
    """Bytes per rank of the model state of a TP-GRPO run, by part.

    Parts: the frozen transformer, the text encoders (0 with ``text_encoders_on_device=False``:
    released or offloaded to the CPU; ``offload_text_encoders`` brings them back for each
    ``encode``, so that moment's peak still holds them), the VAE — all three in
    ``weights_dtype`` — and the float32 LoRA weights, their AdamW state (two float32 values per
    weight) and gradients.

    ``strategy``: "ddp" replicates everything; "fsdp2" (``fully_shard`` per transformer block,
    as `tpgrpo.distributed` does) splits the transformer's parameters (frozen and LoRA), the LoRA
    gradients and the optimizer state evenly over ``world_size`` ranks and replicates the text
    encoders, the VAE and the transformer's floating buffers. Uneven-split padding is left out.

    Not included: activations (they depend on batch, resolution and checkpointing), FSDP2's
    transient all-gathered blocks, DDP's gradient buckets, the CUDA context and allocator slack.
    """
    if strategy not in STRATEGIES:
        raise UserInputError(f"unknown strategy {strategy!r}; use one of {list(STRATEGIES)}")
    if world_size < 1:
        raise UserInputError(f"world_size must be >= 1, got {world_size}")
    width = parse_dtype(weights_dtype).itemsize
    sizes = component_sizes(family)
    shards = world_size if strategy == "fsdp2" else 1
    transformer = sizes["transformer"]
    text_encoders = sum(
        size.parameters + size.floating_buffers for name, size in sizes.items() if name in TEXT_ENCODERS
    )
    vae = sizes["vae"]
    lora_bytes = lora_parameter_count(family, lora_rank) * LORA_BYTES_PER_VALUE
    return {
        "transformer (frozen)": (
            _per_rank(transformer.parameters * width, shards) + transformer.floating_buffers * width
        ),
        "text encoders": text_encoders * width if text_encoders_on_device else 0,
        "VAE": (vae.parameters + vae.floating_buffers) * width,
        "LoRA weights": _per_rank(lora_bytes, shards),
        "AdamW state": _per_rank(ADAM_STATES_PER_WEIGHT * lora_bytes, shards),
        "gradients": _per_rank(lora_bytes, shards),
    }


WEIGHTS_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def _gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def markdown_table(family: str, world_size: int, lora_rank: int) -> str:
    """The GiB-per-rank table `main` prints: one column per weights dtype and strategy, one row
    per part, and the totals with the text encoders on the accelerator and released."""
    columns = [(dtype, strategy) for dtype in WEIGHTS_DTYPES for strategy in STRATEGIES]
    tables = [memory_table(family, dtype, strategy, world_size, lora_rank) for dtype, strategy in columns]
    counts = parameter_counts(family)
    sizes = component_sizes(family)
    text_parameters = sum(count for name, count in counts.items() if name in TEXT_ENCODERS)
    parameters = {
        "transformer (frozen)": counts["transformer"],
        "text encoders": text_parameters,
        "VAE": counts["vae"],
        "LoRA weights": lora_parameter_count(family, lora_rank),
    }
    lines = [
        f"{FAMILY_TITLES[family]} (`{HUB_REPOS[family]}`): GiB per rank, world size {world_size}, "
        f"LoRA rank {lora_rank}.",
        "",
        "| part | parameters | " + " | ".join(f"{dtype} {strategy}" for dtype, strategy in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for part in tables[0]:
        count = f"{parameters[part] / 1e6:,.1f} M" if part in parameters else ""
        lines.append(f"| {part} | {count} | " + " | ".join(_gib(table[part]) for table in tables) + " |")
    totals = [sum(table.values()) for table in tables]
    released = [total - table["text encoders"] for total, table in zip(totals, tables)]
    lines.append("| **total, text encoders on device** | | " + " | ".join(f"**{_gib(v)}**" for v in totals) + " |")
    lines.append("| **total, text encoders released** | | " + " | ".join(f"**{_gib(v)}**" for v in released) + " |")
    lines.append("")
    lines.append(
        "Text encoders: "
        + ", ".join(f"{name} {counts[name] / 1e6:,.1f} M" for name in counts if name in TEXT_ENCODERS)
        + " parameters."
    )
    if sizes["transformer"].floating_buffers:
        lines.append(
            f"The transformer row includes a {sizes['transformer'].floating_buffers / 1e6:,.1f} M-value buffer "
            "(the sin-cos position table): cast with the weights, replicated under fsdp2."
        )
    lines.append("Parameter bytes only, computed from the configs on the meta device: no activations.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Print `markdown_table` for the family, world size and LoRA rank given on the command line."""
    parser = argparse.ArgumentParser(prog="python -m tpgrpo.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", "--family", dest="family", choices=sorted(PIPELINES), default="sd3")
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs) the run is spread over")
    parser.add_argument("--lora-rank", type=int, default=32)
    args = parser.parse_args(argv)
    if args.world_size < 1 or args.lora_rank < 1:
        parser.error("--world-size and --lora-rank must be >= 1")
    print(markdown_table(args.family, args.world_size, args.lora_rank))


if __name__ == "__main__":
    main()
