"""The LightningModule: what a trainer does around an algorithm (`tpgrpo.algorithms`).

It builds the policy (`tpgrpo.training.policy`), the reward and the algorithm from the settings,
and runs each batch: the algorithm collects it (rollouts, rewards, advantages) and plans the update;
the module takes the backward passes, clips gradients, steps the optimizer, skips non-finite steps
and logs. Evaluation scores come from `tpgrpo.training.evaluation.Evaluator`.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from tpgrpo.acceleration import compile_blocks
from tpgrpo.algorithms import ALGORITHMS, Batch, build_algorithm
from tpgrpo.distributed import is_sharded, shard_transformer
from tpgrpo.errors import UserInputError
from tpgrpo.families import FlowModel
from tpgrpo.lora import check_checkpoint_fits, full_tensor, lora_parameters, trainable_state
from tpgrpo.settings import (
    ComputeConfig,
    CreditConfig,
    EvalRewardsSetting,
    EvaluationConfig,
    LoRAConfig,
    NFTConfig,
    OptimizerConfig,
    PromptCacheConfig,
    RewardsSetting,
    SamplingConfig,
    UpdateConfig,
    as_group,
    build_eval_rewards,
    build_rewards,
    group_dicts,
    parse_dtype,
    parse_eval_rewards,
    parse_rewards,
)
from tpgrpo.tiny.components import DEFAULT_MODEL_DIR
from tpgrpo.training import evaluation
from tpgrpo.training.callbacks import PNGWriter
from tpgrpo.training.embedding_cache import PromptCacheCallback
from tpgrpo.training.evaluation import Evaluator
from tpgrpo.training.metrics import training_metrics
from tpgrpo.training.policy import build_policy


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps with NaN or infinite numbers."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


class TPGRPOModule(LightningModule):
    """Reinforcement fine-tuning of a flow-matching model's LoRA: TP-GRPO, Flow-GRPO or DiffusionNFT.

    The settings come in named groups (`tpgrpo.settings`), each checked when it is built; a group
    may be given as its dataclass or as a mapping of its settings.

    Args:
        pretrained_path: hub id or local folder of a diffusers pipeline of a supported family;
            defaults to the shipped tiny model.
        family: "auto" (read the folder) or one of `tpgrpo.families.PIPELINE_FAMILIES`: "sd3",
            "flux", "qwenimage", "flux2", "flux2-dev", "zimage".
        algorithm: the training algorithm (`tpgrpo.algorithms.ALGORITHMS`): "tp-grpo" (turning-point
            credit), "flow-grpo" (outcome credit) or "diffusion-nft".
        rewards: reward names and weights, each a weight or a mapping of the weight and the
            reward's options, e.g. ``{pickscore: 1.0, ocr: {weight: 0.5, engine: tesseract}}``.
        eval_rewards: rewards scored only in validation and test, beside the training reward, to watch
            what the training reward does not measure (reward hacking): ``{name: {option: value}}``
            (``{}`` for a reward's defaults), each logged as ``val/<name>`` with ``val/<name>_stderr``.
            Built at the first evaluation.
        sampling: training rollouts (`tpgrpo.settings.SamplingConfig`).
        credit: credit rule and advantages (`tpgrpo.settings.CreditConfig`).
        nft: DiffusionNFT's setting (`tpgrpo.settings.NFTConfig`).
        update: the clipped GRPO update (`tpgrpo.settings.UpdateConfig`).
        optimizer: AdamW and warm-up (`tpgrpo.settings.OptimizerConfig`).
        lora: the adapter (`tpgrpo.settings.LoRAConfig`).
        evaluation: validation / test / predict sampling (`tpgrpo.settings.EvaluationConfig`).
        compute: compiler and attention kernels (`tpgrpo.settings.ComputeConfig`).
        prompt_cache: text embeddings encoded once per run (`tpgrpo.settings.PromptCacheConfig`).
        max_sequence_length: text tokens of the T5 encoder (SD3 / FLUX).
        weights_dtype: dtype of the frozen transformer, VAE and text encoders: "bfloat16",
            "float16" or "float32". The LoRA weights, optimizer state, SDE maths and log-probs stay
            float32 whatever it is.
        offload_text_encoders: keep the text encoders on the CPU, on the accelerator only while
            they encode.
        seed: base seed of rollout noise and window draws (per rank and step).
    """

    def __init__(
        self,
        pretrained_path: str = str(DEFAULT_MODEL_DIR),
        family: str = "auto",
        algorithm: str = "tp-grpo",
        rewards: RewardsSetting | None = None,
        eval_rewards: EvalRewardsSetting | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        credit: CreditConfig = CreditConfig(),
        nft: NFTConfig = NFTConfig(),
        update: UpdateConfig = UpdateConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        lora: LoRAConfig = LoRAConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        compute: ComputeConfig = ComputeConfig(),
        prompt_cache: PromptCacheConfig = PromptCacheConfig(),
        max_sequence_length: int = 256,
        weights_dtype: str = "float32",
        offload_text_encoders: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.sampling = as_group(SamplingConfig, sampling)
        self.credit = as_group(CreditConfig, credit)
        self.nft = as_group(NFTConfig, nft)
        self.update_config = as_group(UpdateConfig, update)
        self.optimizer_config = as_group(OptimizerConfig, optimizer)
        self.lora = as_group(LoRAConfig, lora)
        self.evaluation = as_group(EvaluationConfig, evaluation)
        self.compute = as_group(ComputeConfig, compute)
        self.prompt_cache = as_group(PromptCacheConfig, prompt_cache)
        self.reward_specs = parse_rewards(rewards)
        self.eval_reward_options = parse_eval_rewards(eval_rewards, [spec.name for spec in self.reward_specs])
        _check(algorithm in ALGORITHMS, f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
        _check(max_sequence_length >= 1, f"max_sequence_length must be >= 1, got {max_sequence_length}")
        dtype = parse_dtype(weights_dtype)
        self.save_hyperparameters(
            {
                "pretrained_path": pretrained_path,
                "family": family,
                "algorithm": algorithm,
                "rewards": {spec.name: {"weight": spec.weight, **spec.options} for spec in self.reward_specs},
                "eval_rewards": self.eval_reward_options,
                **group_dicts(
                    sampling=self.sampling, credit=self.credit, nft=self.nft, update=self.update_config,
                    optimizer=self.optimizer_config, lora=self.lora, evaluation=self.evaluation, compute=self.compute,
                    prompt_cache=self.prompt_cache,
                ),
                "max_sequence_length": max_sequence_length,
                "weights_dtype": weights_dtype,
                "offload_text_encoders": offload_text_encoders,
                "seed": seed,
            }
        )
        self.seed = seed
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the LoRA and training state, not the frozen base
        self.bad_steps = 0  # consecutive skipped steps
        self.skipped_steps = 0
        self.flow: FlowModel = build_policy(
            pretrained_path, family, dtype, max_sequence_length, offload_text_encoders, self.sampling.decode_batch_size,
            self.lora, self.update_config.gradient_checkpointing, self.compute,
        )
        self.transformer = self.flow.transformer
        self._compiled = False
        self.pretrained_path = pretrained_path
        self.reward = build_rewards(self.reward_specs)
        self.evaluator = Evaluator(self.reward, self.eval_reward_options, build_eval_rewards)
        self.algorithm = build_algorithm(
            algorithm, self.flow, self.transformer, self.reward, self.sampling, self.update_config, seed=seed,
            groups={"credit": self.credit, "nft": self.nft},
        )

    def configure_model(self) -> None:
        """Under ``strategy: fsdp2``: shard each transformer block over the ranks (bf16 compute with bf16
        precision); then, with ``compute.compile``, compile each block."""
        if type(self.trainer.strategy).__name__ == "FSDPStrategy":
            rank_zero_warn(
                "strategy fsdp (FSDP1) has not been checked with this module (it needs GPUs, and several backward "
                "passes per step meet FSDP1's resharding); strategy fsdp2 is the tested way to shard"
            )
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy only
        if mesh is not None and not is_sharded(self.transformer):
            param_dtype = torch.bfloat16 if str(self.trainer.precision).startswith("bf16") else None
            shard_transformer(self.transformer, mesh["data_parallel"], param_dtype)
        if self.compute.compile and not self._compiled:  # after sharding: compiled code sees the final modules
            compile_blocks(self.transformer, self.compute.compile_mode)
            self._compiled = True

    # --------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        return self.optimizer_config.build(lora_parameters(self.transformer))

    # ------------------------------------------------------------------------------ rollouts
    def collect(self, batch: Mapping[str, Any], step: Any) -> Batch:
        """Rollouts, rewards and advantages of one batch of the data module (the algorithm's ``collect``)."""
        return self.algorithm.collect(batch["prompts"], batch["metadata"], batch["group_ids"], step)

    # ----------------------------------------------------------------------------------- update
    def _update(self, collected: Batch) -> tuple[dict[str, float], Tensor]:
        """``optimizer_steps_per_batch`` optimizer steps over the batch, as the algorithm plans them
        (`tpgrpo.algorithms.plan_update`): backward of each call's loss times its weight, then
        gradient clipping and the step.

        Every rollout batch takes exactly that many steps (so ``max_steps`` and resuming count
        the same way whatever happens); a step without images with a learning signal, or with a
        non-finite gradient, has no gradients and leaves the weights unchanged. Returns the
        metrics and each step's loss (this rank's share of it summed over ranks).
        """
        world_size = self.algorithm.comm().world_size
        plans = self.algorithm.plan(collected, self.update_config.optimizer_steps_per_batch)
        totals: dict[str, list[Tensor]] = {}
        step_losses = torch.zeros(len(plans))
        first: dict[str, Tensor] = {}  # the ratio's range on the first step
        for index, plan in enumerate(plans):
            for call in plan.calls:
                loss, metrics = self.algorithm.loss(collected, call.rows, call.units)
                self.manual_backward(loss * call.weight)
                step_losses[index] += float(loss.detach()) * call.weight / world_size
                if not call.padding:
                    for key, value in metrics.items():
                        totals.setdefault(key, []).append(value)
            if index == 0 and "ratio_min" in totals:  # the first step recomputes the rollout's transitions: ratio 1
                first = {"first_ratio_min": min(totals["ratio_min"]), "first_ratio_max": max(totals["ratio_max"])}
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(lora_parameters(self.transformer), self.update_config.max_grad_norm))
            if plan.images_on_all_ranks and not torch.isfinite(grad_norm):
                self.optimizers().zero_grad(set_to_none=True)
                self._skip_step("the loss or its gradient is NaN or infinite")
            elif plan.images_on_all_ranks:
                self.bad_steps = 0
                totals.setdefault("grad_norm", []).append(grad_norm.detach())
            self._optimizer_step()
        out = {key: float(torch.stack(values).float().mean()) for key, values in totals.items()}
        out.update({key: float(value) for key, value in first.items()})
        out["active_fraction"] = float(self.algorithm.trained_rows(collected).float().mean())
        return out, step_losses

    def _optimizer_step(self) -> None:
        """One optimizer and scheduler step (a no-op for weights without gradients)."""
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    # ------------------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        """Collect a rollout batch and take the clipped GRPO steps; returns, for callbacks, the
        batch's rewards, step rewards, advantages, group ids, step losses, final images, the
        seconds of each phase and the NFE per image."""
        started = time.perf_counter()
        step_key = (self.current_epoch, batch_idx, self.global_step)
        collected = self.collect(batch, step_key)
        if self.algorithm.comm().max(float(not torch.isfinite(collected.rewards).all())):
            self._skip_step("the reward is NaN or infinite for some images")
            for _ in range(self.update_config.optimizer_steps_per_batch):
                self._optimizer_step()
            return None
        update_started = time.perf_counter()
        update_metrics, step_losses = self._update(collected)
        timings = {**self.algorithm.timings, "update": time.perf_counter() - update_started}
        self._log_training(collected, update_metrics, time.perf_counter() - started, timings)
        return {
            "rewards": collected.rewards,
            "step_rewards": getattr(collected, "step_rewards", None),
            "advantages": collected.advantages,
            "group_ids": collected.group_ids,
            "step_losses": step_losses,
            "images": collected.images,
            "timings": timings,
            "nfe_per_image": collected.nfe_per_image,
        }

    def _skip_step(self, reason: str) -> None:
        """Count a skipped (non-finite) step; stop after ``max_bad_steps`` in a row."""
        self.bad_steps += 1
        self.skipped_steps += 1
        rank_zero_warn(f"skipping a training step: {reason} ({self.bad_steps} in a row)")
        self.log("train/skipped_steps", float(self.skipped_steps))
        if self.bad_steps > self.update_config.max_bad_steps:
            raise TrainingDivergedError(
                f"{self.bad_steps} consecutive training steps had NaN/inf values ({reason}); "
                "lower the learning rate, check the reward, or resume from the last checkpoint"
            )

    def _log_training(self, collected: Batch, update: dict[str, float], elapsed: float, timings: dict[str, float]) -> None:
        learning_rate = self.optimizers().param_groups[0]["lr"]
        metrics = training_metrics(collected, update, elapsed, timings, self.algorithm.comm().world_size, learning_rate)
        # on the module's device: NCCL reduces only GPU tensors
        metrics = {key: value.to(self.device) for key, value in metrics.items()}
        batch_size = len(collected)
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=batch_size, sync_dist=True)
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, batch_size=batch_size, sync_dist=True)

    # ------------------------------------------------------------------------------ evaluation
    def sample(self, prompts: Sequence[str], seeds: Tensor) -> Tensor:
        """Deterministic ODE samples (N, 3, H, W) in [0, 1], one per prompt and seed (`tpgrpo.training.evaluation.sample`)."""
        return evaluation.sample(self.algorithm, prompts, seeds, self.evaluation.num_steps, self.evaluation.guidance_scale)

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> dict[str, Any]:
        """Sample and score one evaluation batch; log the mean of each score. Returns, for
        callbacks (`tpgrpo.training.evaluation.EvalResults`, `tpgrpo.training.callbacks.ImageGrids`), the images,
        prompts and per-image scores of the batch's real (not padding) rows."""
        real = self._real_rows(batch)
        images = self.sample(batch["prompts"], batch["seeds"])[real]
        prompts = [p for p, keep in zip(batch["prompts"], real.tolist()) if keep]
        metadata = [m for m, keep in zip(batch["metadata"], real.tolist()) if keep]
        scores = self.evaluator.score(images, prompts, metadata)
        for key, value in scores.items():
            applicable = value[~value.isnan()]  # NaN marks a check that does not apply to a prompt
            if applicable.numel():
                mean = applicable.mean().to(self.device)  # NCCL reduces only GPU tensors
                self.log(f"{stage}/{key}", mean, batch_size=applicable.numel(), sync_dist=True)
        return {"images": images, "prompts": prompts, "scores": scores}

    @staticmethod
    def _real_rows(batch: Mapping[str, Any]) -> Tensor:
        """Rows that are not padding (`tpgrpo.training.data.EvalSampler` pads ranks to equal batches)."""
        return batch.get("real", torch.ones(len(batch["prompts"]), dtype=torch.bool)).cpu()

    def _finish_eval(self, stage: str) -> None:
        """Log what needs all ranks' images: the standard errors of the reward and of each evaluation
        reward, and every reward's own summary (`tpgrpo.rewards.Reward.summarise`)."""
        summary = self.evaluator.finish(self.algorithm.comm())
        for key, stderr in summary.stderrs.items():
            self.log(f"{stage}/{key}_stderr", stderr, sync_dist=False, rank_zero_only=True)
        for key, value in summary.summaries.items():
            self.log(f"{stage}/{key}", value, sync_dist=False, rank_zero_only=True)

    # ------------------------------------------------------------------------------ evaluation hooks
    def configure_callbacks(self) -> list:
        """The module's own callbacks: the prompt-embedding cache's lifecycle and the PNG writer of ``predict``."""
        return [PromptCacheCallback(), PNGWriter(self.evaluation.predict_dir)]

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start()

    def on_test_epoch_start(self) -> None:
        self.evaluator.start()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Any]:
        """Samples of the batch's prompts and seeds, for `tpgrpo.training.callbacks.PNGWriter`."""
        images = self.sample(batch["prompts"], batch["seeds"])
        return {"images": images, "index": batch["index"], "seeds": batch["seeds"], "real": self._real_rows(batch)}

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable (LoRA) weights: the frozen base comes from ``pretrained_path``."""
        checkpoint["state_dict"] = trainable_state(checkpoint["state_dict"], self)
        from tpgrpo.rng import rng_states

        # counters that are logged, and the global RNGs (rollouts use their own seeded generators)
        checkpoint["tpgrpo"] = {
            "skipped_steps": self.skipped_steps,
            "bad_steps": self.bad_steps,
            "rng_states": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's LoRA fits this model (loading is not strict), restore counters and RNGs."""
        if checkpoint.get("state_dict") is not None:  # fsdp2 loads the weights itself and passes none on
            check_checkpoint_fits(checkpoint["state_dict"], self)
        from tpgrpo.rng import set_rng_states

        state = checkpoint.get("tpgrpo", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_steps = state.get("bad_steps", 0)
        if "rng_states" in state:
            set_rng_states(state["rng_states"])
