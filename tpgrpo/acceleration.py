"""Compiler and attention kernels for the transformer (`tpgrpo.settings.ComputeConfig`).

`compile_blocks` compiles each repeated block in place (regional compilation: every block of a
model has the same code, so one compiled graph serves them all and compiling takes a fraction of
compiling the whole model); `set_attention_backend` selects diffusers' attention kernel where the
family's attention processor dispatches through diffusers.
"""
from __future__ import annotations

import torch
from torch import nn

from tpgrpo.distributed import transformer_blocks
from tpgrpo.errors import UserInputError


def compile_blocks(transformer: nn.Module, mode: str | None = None) -> int:
    """``torch.compile`` every block of ``transformer`` in place (`nn.Module.compile`); returns how many.

    Apply after LoRA is added and after FSDP2 sharding, so the compiled code sees the final modules.
    """
    blocks = transformer_blocks(transformer)
    for block in blocks:
        block.compile(mode=mode)
    return len(blocks)


def attention_processors(transformer: nn.Module) -> list:
    """The attention processors of ``transformer``'s attention layers."""
    return [module.processor for module in transformer.modules() if getattr(module, "processor", None) is not None]


def set_attention_backend(transformer: nn.Module, backend: str) -> None:
    """Run ``transformer``'s attention through diffusers' ``backend`` ("native": leave torch SDPA).

    One line of error when the family's attention processors do not dispatch through diffusers
    (SD3's ``JointAttnProcessor2_0`` calls torch SDPA itself) or the backend's package is missing.
    """
    if backend == "native":
        return
    processors = attention_processors(transformer)
    unsupported = sorted({type(p).__name__ for p in processors if not hasattr(p, "_attention_backend")})
    if unsupported or not processors:
        raise UserInputError(
            f"compute.attention_backend {backend!r} needs attention processors that dispatch through diffusers; "
            f"{type(transformer).__name__} uses {', '.join(unsupported) or 'none'}: use 'native' (torch SDPA picks its "
            "fastest kernel on GPUs by itself)"
        )
    try:
        transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as error:
        raise UserInputError(f"compute.attention_backend {backend!r} is not usable here: {error}") from None


def compiler_available() -> tuple[bool, str]:
    """Whether ``torch.compile`` can build code on this machine, and why not."""
    import shutil

    if not hasattr(torch, "compile"):
        return False, "this torch has no torch.compile"
    if not torch.cuda.is_available() and shutil.which("g++") is None and shutil.which("c++") is None:
        return False, "torch.compile on CPU needs a C++ compiler (g++), and none is on PATH"
    return True, ""
