"""Exponential moving average of the trainable (LoRA) parameters, as a Lightning callback."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from tpgrpo.lora import full_tensor, trainable_parameters


def _laid_out_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor or a DTensor) in float32 on ``param``'s device, sharded as
    ``param`` is when it is an FSDP2 DTensor, so the two combine elementwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        if isinstance(value, DTensor) and value.placements == param.placements:
            return value.to(torch.float32)
        return distribute_tensor(full_tensor(value).to(param.device, torch.float32), param.device_mesh, param.placements)
    return full_tensor(value).to(param.device, torch.float32)


class LoRAEMA(Callback):
    """Keeps ``ema = decay·ema + (1 - decay)·param`` of every trainable parameter.

    Updated every ``every`` optimizer steps (spec §4: decay 0.9 every 8 steps). Validation,
    test and predict run with the EMA weights swapped in; the EMA is saved in checkpoints as whole
    tensors, so a checkpoint moves between one process and FSDP2-sharded ranks (each shard of
    the EMA lives beside its shard of the weights).
    """

    def __init__(self, decay: float = 0.9, every: int = 8):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA update interval must be >= 1, got {every}")
        self.decay = decay
        self.every = every
        self.shadow: dict[str, torch.Tensor] = {}  # keyed by parameter name
        self._last_step = -1

    def _params(self, pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        """The module's trainable parameters by name; the EMA must hold exactly these."""
        params = trainable_parameters(pl_module)
        if self.shadow and set(self.shadow) != set(params):
            missing = sorted(set(params) ^ set(self.shadow))[0]
            raise ValueError(f"the EMA weights do not fit the model's LoRA (e.g. {missing}); resume with the same LoRA settings")
        return params

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = self._params(pl_module)
        if not self.shadow:
            self.shadow = {name: p.detach().clone().float() for name, p in params.items()}
        else:
            self.shadow = {name: _laid_out_like(self.shadow[name], p) for name, p in params.items()}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._step_before_batch = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        """Update once per multiple of ``every`` optimizer steps the batch crossed.

        A batch takes several optimizer steps (``optimizer_steps_per_batch``), so ``global_step``
        may jump over a multiple of ``every``; ``k`` updates crossed in one batch all see the same
        weights, i.e. one update with ``decay ** k``.
        """
        step = trainer.global_step
        before = max(getattr(self, "_step_before_batch", step - 1), self._last_step, 0)
        crossed = step // self.every - before // self.every
        if crossed <= 0:
            return
        self._last_step = step
        weight = 1.0 - self.decay**crossed
        with torch.no_grad():
            for name, param in self._params(pl_module).items():
                self.shadow[name].lerp_(param.detach().float(), weight)

    @contextmanager
    def swapped_in(self, pl_module: LightningModule):
        """Context in which the module's trainable parameters hold the EMA values."""
        params = self._params(pl_module)
        if not self.shadow:
            yield
            return
        backup = {name: p.detach().clone() for name, p in params.items()}
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(_laid_out_like(self.shadow[name], p).to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def _enter(self, pl_module: LightningModule) -> None:
        self._context = self.swapped_in(pl_module)
        self._context.__enter__()

    def _exit(self) -> None:
        self._context.__exit__(None, None, None)

    def on_validation_start(self, trainer, pl_module):
        self._enter(pl_module)

    def on_validation_end(self, trainer, pl_module):
        self._exit()

    on_test_start = on_validation_start
    on_test_end = on_validation_end
    on_predict_start = on_validation_start
    on_predict_end = on_validation_end

    def state_dict(self) -> dict:
        """Whole tensors on the CPU (gathered from the ranks' shards under FSDP2; every rank calls this)."""
        return {"shadow": {name: full_tensor(s).cpu() for name, s in self.shadow.items()}, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict.get("shadow"), dict):
            raise ValueError("the checkpoint's EMA state is from an older tpgrpo (weights by position, not by name)")
        self.shadow = {name: s.clone() for name, s in state_dict["shadow"].items()}
        self._last_step = state_dict["last_step"]
