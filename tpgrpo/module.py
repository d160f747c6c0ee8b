"""The LightningModule: grouped rollouts, rewards, credit, advantages and the clipped GRPO step.

It composes the pure pieces: `tpgrpo.rollout` (trajectories and branches), `tpgrpo.rewards`
(scores), `tpgrpo.credit` (per-step rewards, advantages, loss) and `tpgrpo.sde` (log-probs,
KL). The model side (encode, velocity, decode) lives in `tpgrpo.pipelines`, LoRA in
`tpgrpo.lora`.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from tpgrpo import credit as credit_rules
from tpgrpo.distributed import all_ranks_max, all_ranks_sum, gather_rows, is_sharded, shard_transformer, world_size
from tpgrpo.errors import UserInputError
from tpgrpo.evaluation import mean_and_stderr
from tpgrpo.images import image_grid
from tpgrpo.lora import add_lora, disabled_adapter, full_tensor, lora_parameters, trainable_parameters
from tpgrpo.pipelines import FlowModel, PromptEmbeds, load_flow_model
from tpgrpo.prompt_length import PromptLengthCheck
from tpgrpo.rollout import Rollout, ode_sample, rollout, sample_window_start
from tpgrpo.sde import kl_to_reference, sde_step, step_std
from tpgrpo.settings import (
    CreditConfig,
    EvaluationConfig,
    LoRAConfig,
    OptimizerConfig,
    RewardsSetting,
    SamplingConfig,
    UpdateConfig,
    as_group,
    build_rewards,
    group_dicts,
    parse_rewards,
)
from tpgrpo.tiny.components import DEFAULT_MODEL_DIR


class TrainingDivergedError(RuntimeError):
    """Too many consecutive steps with NaN or infinite numbers."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


def _seed_for(*parts: Any) -> int:
    """A reproducible 63-bit seed from any values (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode()) * 2654435761 % (2**63 - 1)


class TPGRPOModule(LightningModule):
    """TP-GRPO (or Flow-GRPO with ``credit.method: outcome``) fine-tuning of a flow-matching model's LoRA.

    The settings come in named groups (`tpgrpo.settings`), each checked when it is built; a group
    may be given as its dataclass or as a mapping of its settings.

    Args:
        pretrained_path: hub id or local folder of a diffusers SD3 / FLUX pipeline; defaults to
            the shipped tiny model.
        family: "auto" (read the folder), "sd3" or "flux".
        rewards: reward names and weights, each a weight or a mapping of the weight and the
            reward's options, e.g. ``{pickscore: 1.0, ocr: {weight: 0.5, engine: tesseract}}``.
        sampling: training rollouts (`tpgrpo.settings.SamplingConfig`).
        credit: turning-point or outcome credit and advantages (`tpgrpo.settings.CreditConfig`).
        update: the clipped GRPO update (`tpgrpo.settings.UpdateConfig`).
        optimizer: AdamW and warm-up (`tpgrpo.settings.OptimizerConfig`).
        lora: the adapter (`tpgrpo.settings.LoRAConfig`).
        evaluation: validation / test / predict and image logging (`tpgrpo.settings.EvaluationConfig`).
        max_sequence_length: text tokens of the T5 encoder (SD3 / FLUX).
        seed: base seed of rollout noise and window draws (per rank and step).
    """

    def __init__(
        self,
        pretrained_path: str = str(DEFAULT_MODEL_DIR),
        family: str = "auto",
        rewards: RewardsSetting | None = None,
        sampling: SamplingConfig = SamplingConfig(),
        credit: CreditConfig = CreditConfig(),
        update: UpdateConfig = UpdateConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        lora: LoRAConfig = LoRAConfig(),
        evaluation: EvaluationConfig = EvaluationConfig(),
        max_sequence_length: int = 256,
        seed: int = 0,
    ):
        super().__init__()
        self.sampling = as_group(SamplingConfig, sampling)
        self.credit = as_group(CreditConfig, credit)
        self.update_config = as_group(UpdateConfig, update)
        self.optimizer_config = as_group(OptimizerConfig, optimizer)
        self.lora = as_group(LoRAConfig, lora)
        self.evaluation = as_group(EvaluationConfig, evaluation)
        self.reward_specs = parse_rewards(rewards)
        _check(max_sequence_length >= 1, f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.save_hyperparameters(
            {
                "pretrained_path": pretrained_path,
                "family": family,
                "rewards": {spec.name: {"weight": spec.weight, **spec.options} for spec in self.reward_specs},
                **group_dicts(
                    sampling=self.sampling, credit=self.credit, update=self.update_config,
                    optimizer=self.optimizer_config, lora=self.lora, evaluation=self.evaluation,
                ),
                "max_sequence_length": max_sequence_length,
                "seed": seed,
            }
        )
        self.seed = seed
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the LoRA and training state, not the frozen base
        self.bad_steps = 0  # consecutive skipped steps
        self.skipped_steps = 0
        self.flow: FlowModel = load_flow_model(
            pretrained_path,
            family=family,
            max_sequence_length=max_sequence_length,
            decode_batch_size=self.sampling.decode_batch_size,
        )
        self.transformer = self.flow.transformer
        add_lora(
            self.transformer, rank=self.lora.rank, alpha=self.lora.alpha, target_modules=self.lora.targets,
            family=self.flow.family,
        )
        if self.update_config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.reward = build_rewards(rewards)

    def configure_model(self) -> None:
        """Under ``strategy: fsdp2``: shard each transformer block over the ranks (bf16 compute with bf16 precision)."""
        if type(self.trainer.strategy).__name__ == "FSDPStrategy":
            rank_zero_warn(
                "strategy fsdp (FSDP1) has not been checked with this module (it needs GPUs, and several backward "
                "passes per step meet FSDP1's resharding); strategy fsdp2 is the tested way to shard"
            )
        mesh = getattr(self, "_device_mesh", None)  # set by Lightning's ModelParallelStrategy only
        if mesh is None or is_sharded(self.transformer):
            return
        param_dtype = torch.bfloat16 if str(self.trainer.precision).startswith("bf16") else None
        shard_transformer(self.transformer, mesh["data_parallel"], param_dtype)

    # --------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            lora_parameters(self.transformer),
            lr=self.optimizer_config.learning_rate,
            betas=tuple(self.optimizer_config.betas),
            weight_decay=self.optimizer_config.weight_decay,
            eps=self.optimizer_config.eps,
        )
        warmup = max(self.optimizer_config.warmup_steps, 0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------ model pieces
    def _conditioning(self, prompts: Sequence[str]) -> PromptEmbeds:
        """Text embeddings (N rows) of each image's prompt; `FlowModel.encode` encodes each prompt once.

        A prompt longer than a text encoder reads is truncated, with one warning per run.
        """
        if getattr(self, "_prompt_length_check", None) is None:
            self._prompt_length_check = PromptLengthCheck(self.flow.pipe, self.flow.max_sequence_length)
        with self._prompt_length_check(prompts):
            return self.flow.encode(list(prompts))

    def _velocity_fn(self, cond: PromptEmbeds, guidance: float):
        """The rollout's ``velocity_fn(latents, sigma, rows)`` for the current policy (CFG inside)."""

        def velocity(latents: Tensor, sigma: float, rows: Tensor) -> Tensor:
            return self.flow.velocity(
                latents, sigma, cond.index(rows), guidance_scale=guidance, transformer=self.transformer
            )

        return velocity

    def _rollout_noise(self, group_ids: Tensor, step: Any) -> tuple[Tensor, Tensor]:
        """Initial (N, C, h, w) and SDE-window (N, W, C, h, w) noise of a rollout batch.

        Each image draws from its own seed ``(seed, step, group id, member)`` (the initial noise
        from ``(seed, step, group id)`` with ``same_noise_per_group``), so an image gets the same
        noise whichever rank or batch position it has: seeds differ per rank, runs are reproducible,
        and N ranks compute what one process computes on the union of their batches.
        """
        shape = self.flow.latent_shape(self.sampling.resolution)
        groups, members = group_ids.tolist(), credit_rules.group_members(group_ids).tolist()
        initial, window = [], []
        for group, member in zip(groups, members):
            generator = torch.Generator().manual_seed(_seed_for(self.seed, step, group, member))
            if self.sampling.same_noise_per_group:
                initial.append(torch.randn(shape, generator=torch.Generator().manual_seed(_seed_for(self.seed, step, group))))
            else:
                initial.append(torch.randn(shape, generator=generator))
            window.append(torch.randn((self.sampling.window_size, *shape), generator=generator))
        return torch.stack(initial).to(self.device), torch.stack(window).to(self.device)

    def _credit(self, sequence: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per-step rewards and advantages (N, W) of this rank's images from their rewards (N, W+1),
        and the turning points that got the long-term reward (bool (N, W); None for outcome credit).

        Turning points are balanced over this rank's batch (spec §3) or, with
        ``balance_scope="global"``, over all ranks' batches; ``global_std`` divides by the std of
        all ranks' step rewards. Groups are never split over ranks (`tpgrpo.data.GroupSampler`).
        The returned turning points are the ones that trained, so logging them shows what trained.
        """
        credit = self.credit
        own = slice(self.global_rank * len(group_ids), (self.global_rank + 1) * len(group_ids))
        rows = gather_rows(sequence) if credit.balance_scope == "global" and world_size() > 1 else sequence
        options = (
            {"eta": credit.eta, "balance": credit.balance} if credit.method == "tp" else {"num_steps": self.sampling.window_size}
        )
        per_step = credit_rules.step_rewards(credit.method, rows, **options)
        kept = credit_rules.turning_points(rows, balance=credit.balance) if credit.method == "tp" else None
        if rows is not sequence:
            per_step, kept = per_step[own], kept[own] if kept is not None else None
        if credit.global_std and world_size() > 1:
            advantages = credit_rules.group_advantages(
                gather_rows(per_step), gather_rows(group_ids), eps=credit.advantage_eps, global_std=True,
                clip=credit.advantage_clip,
            )[own]
        else:
            advantages = credit_rules.group_advantages(
                per_step, group_ids, eps=credit.advantage_eps, global_std=credit.global_std, clip=credit.advantage_clip
            )
        return per_step, advantages, kept

    def _score(
        self, latents: Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Decode (N, C, h, w) latents and score them: scores (each (N,) float32) and the images."""
        images = self.flow.decode(latents)
        return self.reward(images, list(prompts), list(metadata)), images

    def trained_transitions(self, result: Rollout) -> list[int]:
        """The one place that decides which window transitions are trained: all of them."""
        return list(range(result.window_size))

    # --------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def collect(self, batch: Mapping[str, Any], step: Any) -> dict[str, Any]:
        """Rollout, rewards, credit and advantages of one batch of prompts × group size.

        ``step`` (any hashable value) seeds the rollout noise together with ``seed`` and the rank.
        """
        prompts, metadata, group_ids = batch["prompts"], batch["metadata"], batch["group_ids"].to(self.device)
        # the same window on every rank: ranks must make the same transformer calls (see tpgrpo.distributed)
        window_start = sample_window_start(
            self.sampling.num_steps, self.sampling.window_size, self.sampling.window_range, torch.Generator().manual_seed(_seed_for(self.seed, step))
        )
        initial_noise, step_noise = self._rollout_noise(group_ids, step)
        cond = self._conditioning(prompts)
        was_training = self.transformer.training
        self.transformer.eval()
        result = rollout(
            self._velocity_fn(cond, self.sampling.guidance_scale),
            initial_noise,
            self.flow.sigmas(self.sampling.num_steps, self.sampling.resolution).to(self.device),
            window_start,
            self.sampling.window_size,
            self.sampling.noise_level,
            kind=self.sampling.step_kind,
            branches=self.credit.method == "tp",
            step_noise=step_noise,
            branch_steps=self.credit.branch_steps,
            max_batch=self.sampling.rollout_max_batch,
        )
        self.transformer.train(was_training)
        num_images, completions = result.final_latents.shape[:2]
        flat = result.final_latents.flatten(0, 1)
        scores, images = self._score(
            flat,
            [p for p in prompts for _ in range(completions)],
            [m for m in metadata for _ in range(completions)],
        )
        sequence = scores["reward"].view(num_images, completions)
        per_step, advantages, kept = self._credit(sequence, group_ids)
        return {
            "rollout": result,
            "cond": cond,
            "group_ids": group_ids,
            "rewards": sequence,
            "scores": {k: v.view(num_images, completions) for k, v in scores.items()},
            "step_rewards": per_step,
            "turning_points": kept,
            "advantages": advantages,
            "images": images.view(num_images, completions, *images.shape[1:])[:, -1],
        }

    # ----------------------------------------------------------------------------------- update
    def transition_loss(
        self, result: Rollout, index: int, rows: Tensor, advantages: Tensor, cond: PromptEmbeds
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Clipped policy loss (+ β·KL) of window transition ``index`` for the images ``rows``."""
        sigma = float(result.trained_sigmas[index])
        sigma_next = float(result.trained_sigmas_next[index])
        sample = result.states[rows, index]
        taken = result.states[rows, index + 1]
        velocity_fn = self._velocity_fn(cond, self.sampling.guidance_scale)
        velocity = velocity_fn(sample, sigma, rows)
        _, log_prob, mean = sde_step(velocity, sample, sigma, sigma_next, self.sampling.noise_level, self.sampling.step_kind, prev_sample=taken)
        loss, metrics = credit_rules.clipped_policy_loss(
            log_prob, result.log_probs[rows, index], advantages, self.update_config.clip_range, advantage_clip=None
        )  # advantages were clipped once, in `_credit`
        if self.update_config.kl_beta > 0:
            with torch.no_grad(), disabled_adapter(self.transformer):
                reference_velocity = velocity_fn(sample, sigma, rows)
            _, _, reference_mean = sde_step(
                reference_velocity, sample, sigma, sigma_next, self.sampling.noise_level, self.sampling.step_kind, prev_sample=taken
            )
            std = step_std(torch.tensor(sigma), torch.tensor(sigma_next), self.sampling.noise_level, self.sampling.step_kind)
            kl = kl_to_reference(mean, reference_mean, std).mean()
            loss = loss + self.update_config.kl_beta * kl
            metrics["kl"] = kl.detach()
        metrics["policy_loss"] = loss.detach()
        metrics["log_prob_diff"] = (log_prob.detach() - result.log_probs[rows, index]).abs().max()
        return loss, metrics

    def _update(self, collected: dict[str, Any]) -> dict[str, float]:
        """``optimizer_steps_per_batch`` optimizer steps over the batch's images, split evenly.

        Every rollout batch takes exactly that many steps (so ``max_steps`` and resuming count
        the same way whatever happens); a step without images with a learning signal, or with a
        non-finite gradient, has no gradients and leaves the weights unchanged. Images go to
        steps by `tpgrpo.credit.update_parts`, and each step's loss is the mean over that part's
        images on all ranks, so N ranks take the steps one process takes on their joint batch.
        """
        advantages = collected["advantages"]
        active = credit_rules.active_rows(advantages)
        part_of = credit_rules.update_parts(collected["group_ids"], self.update_config.optimizer_steps_per_batch)
        totals: dict[str, list[Tensor]] = {}
        step_losses = torch.zeros(self.update_config.optimizer_steps_per_batch)
        for index in range(self.update_config.optimizer_steps_per_batch):
            part = (active & (part_of == index)).nonzero().flatten()
            part_total = int(all_ranks_sum(part.numel(), self.device))
            if part_total:
                step_losses[index] = self._accumulate(collected, part, part_total, totals)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(lora_parameters(self.transformer), self.update_config.max_grad_norm))
            if part_total and not torch.isfinite(grad_norm):
                self.optimizers().zero_grad(set_to_none=True)
                self._skip_step("the loss or its gradient is NaN or infinite")
            elif part_total:
                self.bad_steps = 0
                totals.setdefault("grad_norm", []).append(grad_norm.detach())
            self._optimizer_step()
        collected["step_losses"] = step_losses
        out = {key: float(torch.stack(values).float().mean()) for key, values in totals.items()}
        out["active_fraction"] = float(active.float().mean())
        return out

    def _accumulate(self, collected: dict[str, Any], part: Tensor, part_total: int, totals: dict[str, list[Tensor]]) -> float:
        """Backward of the loss over the images ``part`` (of ``part_total`` on all ranks) and all trained transitions.

        Gradients are averaged over ranks after each backward pass, hence the factor of the world
        size. Ranks with fewer micro-batches run zero-weighted ones, so all make the same calls.
        Returns this rank's share of the step's loss (the shares of all ranks add up to it).
        """
        result: Rollout = collected["rollout"]
        transitions = self.trained_transitions(result)
        micro = self.update_config.train_micro_batch or max(part.numel(), 1)
        chunks = list(part.split(micro))
        real_chunks = len(chunks)
        needed = int(all_ranks_max(real_chunks, self.device))
        share = 0.0
        chunks += [torch.zeros(1, dtype=torch.long, device=part.device)] * (needed - real_chunks)
        for number, rows in enumerate(chunks):
            real = number < real_chunks
            weight = rows.numel() / part_total / len(transitions) * world_size() if real else 0.0
            for index in transitions:
                loss, metrics = self.transition_loss(
                    result, index, rows, collected["advantages"][rows, index], collected["cond"]
                )
                self.manual_backward(loss * weight)
                share += float(loss.detach()) * weight / world_size()
                for key, value in metrics.items():
                    if real:
                        totals.setdefault(key, []).append(value)
        return share

    def _optimizer_step(self) -> None:
        """One optimizer and scheduler step (a no-op for weights without gradients)."""
        optimizer = self.optimizers()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()

    # ------------------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict[str, Tensor] | None:
        started = time.perf_counter()
        step_key = (self.current_epoch, batch_idx, self.global_step)
        collected = self.collect(batch, step_key)
        if all_ranks_max(float(not torch.isfinite(collected["rewards"]).all()), self.device):
            self._skip_step("the reward is NaN or infinite for some images")
            for _ in range(self.update_config.optimizer_steps_per_batch):
                self._optimizer_step()
            return None
        update_metrics = self._update(collected)
        elapsed = time.perf_counter() - started
        self._log_training(collected, update_metrics, elapsed)
        # passed to callbacks' on_train_batch_end as ``outputs``
        keys = ("rewards", "step_rewards", "advantages", "group_ids", "step_losses")
        return {key: collected[key].detach() for key in keys}

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

    def _log_training(self, collected: dict[str, Any], update: dict[str, float], elapsed: float) -> None:
        sequence = collected["rewards"]
        final = sequence[:, -1]
        metrics = {
            "train/reward_mean": final.mean(),
            "train/reward_std": final.std(unbiased=False),
            "train/images_per_second": torch.tensor(final.numel() / elapsed * world_size()),  # all ranks
            "train/lr": torch.tensor(self.optimizers().param_groups[0]["lr"]),
            "train/nfe_per_image": torch.tensor(float(collected["rollout"].nfe_per_image)),
        }
        for key, value in collected["scores"].items():
            if key != "reward":
                metrics[f"train/{key}"] = value[:, -1].float().nanmean()
        metrics.update({f"train/{k}": torch.tensor(v) for k, v in update.items()})
        kept = collected["turning_points"]
        if kept is not None:
            raw = credit_rules.raw_turning_points(sequence)
            metrics["train/turning_points_kept"] = kept.float().sum()
            metrics["train/turning_points_dropped"] = (raw & ~kept).float().sum()
            for k in range(sequence.shape[1]):
                metrics[f"per_step/R_{k}"] = sequence[:, k].mean()
            for t in range(kept.shape[1]):
                metrics[f"per_step/turning_point_rate_{t}"] = kept[:, t].float().mean()
        advantages = collected["advantages"]
        for t in range(advantages.shape[1]):
            metrics[f"per_step/advantage_abs_mean_{t}"] = advantages[:, t].abs().mean()
            metrics[f"per_step/step_reward_mean_{t}"] = collected["step_rewards"][:, t].mean()
        self.log_dict(metrics, on_step=True, prog_bar=False, batch_size=final.numel(), sync_dist=True)
        self.log("reward", final.mean(), prog_bar=True, batch_size=final.numel(), sync_dist=True)
        every = self.evaluation.log_images_every_n_steps
        if every and self.global_step % every == 0:
            self._log_image_grid("train/samples", collected["images"], final)

    def _log_image_grid(self, tag: str, images: Tensor, rewards: Tensor, prompts: Sequence[str] | None = None) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if experiment is None or not hasattr(experiment, "add_image"):
            return
        count = min(16, images.shape[0])
        experiment.add_image(tag, image_grid(images[:count].float().cpu()), self.global_step)
        captions = [f"{i}: {float(r):.3f}" + (f" {prompts[i]}" if prompts else "") for i, r in enumerate(rewards[:count])]
        experiment.add_text(f"{tag}_captions", "  \n".join(captions), self.global_step)

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Tensor) -> Tensor:
        """Deterministic ODE samples (N, 3, H, W) in [0, 1], one per prompt and seed."""
        noise = torch.stack(
            [self.flow.initial_noise(1, self.sampling.resolution, torch.Generator().manual_seed(int(s)))[0] for s in seeds]
        ).to(self.device)
        velocity_fn = self._velocity_fn(self._conditioning(prompts), self.evaluation.guidance_scale)
        sigmas = self.flow.sigmas(self.evaluation.num_steps, self.sampling.resolution)
        return self.flow.decode(ode_sample(velocity_fn, noise, sigmas, self.sampling.rollout_max_batch))

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        real = self._real_rows(batch)
        images = self.sample(batch["prompts"], batch["seeds"])[real]
        prompts = [p for p, keep in zip(batch["prompts"], real.tolist()) if keep]
        metadata = [m for m, keep in zip(batch["metadata"], real.tolist()) if keep]
        scores = self.reward(images, prompts, metadata) if prompts else {}
        for key, value in scores.items():
            applicable = value[~value.isnan()]  # NaN marks a check that does not apply to a prompt
            if applicable.numel():
                self.log(f"{stage}/{key}", applicable.mean(), batch_size=applicable.numel(), sync_dist=True)
        if scores:
            self._eval_outputs.append({k: v.cpu() for k, v in scores.items()})
        if not self._eval_images and prompts:
            self._eval_images = (images[:16].cpu(), scores["reward"][:16].cpu(), prompts[:16])

    @staticmethod
    def _real_rows(batch: Mapping[str, Any]) -> Tensor:
        """Rows that are not padding (`tpgrpo.data.EvalSampler` pads ranks to equal batches)."""
        return batch.get("real", torch.ones(len(batch["prompts"]), dtype=torch.bool)).cpu()

    def _start_eval(self) -> None:
        self._eval_outputs: list[dict[str, Tensor]] = []
        self._eval_images: tuple | None = None

    def _finish_eval(self, stage: str) -> None:
        """Standard error of the mean reward over all ranks' images; the summary of this rank's scores."""
        local = torch.cat([o["reward"] for o in self._eval_outputs]) if self._eval_outputs else torch.zeros(0)
        # ranks may hold different numbers of images: gather them padded with NaN to the largest count
        length = int(all_ranks_max(local.numel(), self.device))
        padded = torch.full((length,), float("nan"), device=self.device)
        padded[: local.numel()] = local.to(self.device)
        rewards = gather_rows(padded).float()
        rewards = rewards[~rewards.isnan()]
        if not rewards.numel():
            return
        _, stderr = mean_and_stderr(rewards)
        self.log(f"{stage}/reward_stderr", 0.0 if stderr != stderr else stderr, sync_dist=False, rank_zero_only=True)
        self._log_geneval_overall(stage)
        if self._eval_outputs:
            self.eval_summary = {
                key: torch.cat([o[key] for o in self._eval_outputs]).float() for key in self._eval_outputs[0]
            }
        if self._eval_images is not None:
            self._log_image_grid(f"{stage}/samples", *self._eval_images)

    def _log_geneval_overall(self, stage: str) -> None:
        """GenEval's summary number (the mean over its six tags of the correct rate, over all ranks'
        images) when the reward reports per-tag results (the ``geneval`` reward)."""
        from tpgrpo.rewards.geneval import TAGS

        keys = [f"geneval/{tag}" for tag in TAGS]
        if not self._eval_outputs or not all(key in self._eval_outputs[0] for key in keys):
            return
        from tpgrpo.rewards.geneval_detector import geneval_overall

        means = {}
        for key in keys:
            values = torch.cat([o[key] for o in self._eval_outputs]).float()
            applicable = values[~values.isnan()]
            total = all_ranks_sum(float(applicable.sum()), self.device)
            count = all_ranks_sum(float(applicable.numel()), self.device)
            means[key] = float(total / count) if count else float("nan")
        overall = geneval_overall(means)
        if overall == overall:  # not NaN
            self.log(f"{stage}/geneval/overall", overall, sync_dist=False, rank_zero_only=True)

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[str]:
        from pathlib import Path

        from tpgrpo.images import save_image

        out = Path(self.evaluation.predict_dir)
        out.mkdir(parents=True, exist_ok=True)
        images = self.sample(batch["prompts"], batch["seeds"])
        paths = []
        for image, index, seed, real in zip(images, batch["index"], batch["seeds"], self._real_rows(batch)):
            if not real:
                continue
            path = out / f"{int(index):05d}_seed{int(seed)}.png"
            save_image(image, path)
            paths.append(str(path))
        return paths

    # ------------------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only trainable (LoRA) weights: the frozen base comes from ``pretrained_path``."""
        trainable = set(trainable_parameters(self))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        from tpgrpo.rng import rng_states

        # counters that are logged, and the global RNGs (rollouts use their own seeded generators)
        checkpoint["tpgrpo"] = {
            "skipped_steps": self.skipped_steps,
            "bad_steps": self.bad_steps,
            "rng_states": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Check the checkpoint's LoRA fits this model (loading is not strict), restore counters and RNGs."""
        own = trainable_parameters(self)
        saved = checkpoint.get("state_dict")
        if saved is None:  # fsdp2 loads the weights itself and passes on the rest
            saved = dict(own)
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
        from tpgrpo.rng import set_rng_states

        state = checkpoint.get("tpgrpo", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.bad_steps = state.get("bad_steps", 0)
        if "rng_states" in state:
            set_rng_states(state["rng_states"])
