"""The policy a run trains: a flow model of a supported family with a LoRA on its transformer."""
from __future__ import annotations

import torch

from tpgrpo.acceleration import set_attention_backend
from tpgrpo.families import FlowModel, load_flow_model
from tpgrpo.lora import add_lora
from tpgrpo.settings import ComputeConfig, LoRAConfig


def build_policy(
    pretrained_path: str,
    family: str,
    dtype: torch.dtype,
    max_sequence_length: int,
    offload_text_encoders: bool,
    decode_batch_size: int | None,
    lora: LoRAConfig,
    gradient_checkpointing: bool,
    compute: ComputeConfig,
) -> FlowModel:
    """Load the pipeline (`tpgrpo.families.load_flow_model`), put the LoRA of ``lora`` on its
    transformer, and turn on gradient checkpointing and the attention kernel of ``compute``."""
    flow = load_flow_model(
        pretrained_path,
        family=family,
        dtype=dtype,
        max_sequence_length=max_sequence_length,
        offload_text_encoders=offload_text_encoders,
        decode_batch_size=decode_batch_size,
    )
    add_lora(flow.transformer, rank=lora.rank, alpha=lora.alpha, target_modules=lora.targets, family=flow.family)
    if gradient_checkpointing:
        flow.transformer.enable_gradient_checkpointing()
    set_attention_backend(flow.transformer, compute.attention_backend)
    return flow
