"""A callback for the multi-process tests: each rank writes what its training steps returned."""
from pathlib import Path

import torch
from lightning.pytorch import Callback
from safetensors.torch import save_file


class RecordSteps(Callback):
    """Saves every training step's outputs (rewards, advantages, group ids, losses) to ``<directory>/rank<r>_batch<i>.safetensors``."""

    def __init__(self, directory: str):
        self.directory = Path(directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not outputs:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {key: value.detach().cpu().contiguous() for key, value in outputs.items() if torch.is_tensor(value)}
        save_file(tensors, str(self.directory / f"rank{trainer.global_rank}_batch{batch_idx}.safetensors"))
