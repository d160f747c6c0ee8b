"""The model's settings in named groups: typed, documented, and range-checked on construction.

Each group is a frozen dataclass nested under ``model:`` in the YAML (``model.sampling.noise_level``)
and on the command line (``--model.sampling.noise_level 0.5``). A group is checked when it is
built, so a wrong value fails with one line that says what to change, before any weights load;
`check_model_settings` builds every group of a parsed config (``--print_config`` runs it too).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar, Union

import torch

from tpgrpo.errors import UserInputError
from tpgrpo.maths.credit import CREDITS, POLICY_LOSSES
from tpgrpo.maths.sde import STEP_KINDS, StepKind, step_kind
from tpgrpo.rewards.base import RewardSpec, validate_reward_weights


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise UserInputError(message)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingConfig:
    """How training rollouts are sampled.

    Args:
        resolution: image side in pixels.
        num_steps: denoising steps ``T`` of a training rollout.
        guidance_scale: classifier-free guidance during rollouts and training (1 disables CFG).
        noise_level: ``a`` of the SDE step: in (0, 1] for "cps", > 0 for "sde".
        step_kind: "cps" (TP-GRPO default) or "sde" (Flow-GRPO).
        window_size: ``W``, number of stochastic (trained) steps.
        window_range: ``(lo, hi)`` steps the window may cover; the start is drawn from [lo, hi-W]. It may
            not reach a step without noise (the last "cps" step); None: every step with noise.
        same_noise_per_group: all images of a prompt start from the same initial noise.
        rollout_max_batch: most latents per transformer call during rollouts (None: no limit).
        decode_batch_size: most latents per VAE decode call.
    """

    resolution: int = 32
    num_steps: int = 10
    guidance_scale: float = 4.5
    noise_level: float = 0.7
    step_kind: str = "cps"
    window_size: int = 9
    window_range: Union[tuple[int, int], None] = None
    same_noise_per_group: bool = False
    rollout_max_batch: Union[int, None] = None
    decode_batch_size: int = 16

    @property
    def step(self) -> StepKind:
        """The stochastic step of the window: its kind and noise level as one value (`tpgrpo.maths.sde.step_kind`)."""
        return step_kind(self.step_kind, self.noise_level)

    @property
    def last_noisy_step(self) -> int:
        """Index of the last step whose transition has noise: a "cps" step into sigma 0 has none."""
        return self.num_steps - 2 if STEP_KINDS[self.step_kind].noiseless_into_zero else self.num_steps - 1

    def __post_init__(self) -> None:
        _check(self.resolution > 0, f"sampling.resolution must be > 0, got {self.resolution}")
        _check(self.num_steps >= 1, f"sampling.num_steps must be >= 1, got {self.num_steps}")
        _check(
            _finite(self.guidance_scale) and self.guidance_scale >= 0,
            f"sampling.guidance_scale must be >= 0 (1 disables guidance), got {self.guidance_scale}",
        )
        _check(
            self.step_kind in STEP_KINDS, f"sampling.step_kind must be one of {tuple(STEP_KINDS)}, got {self.step_kind!r}"
        )
        _check(
            _finite(self.noise_level) and self.noise_level > 0,
            f"sampling.noise_level must be > 0 (0 leaves no noise, so no log-probabilities to train), got {self.noise_level}",
        )
        try:
            self.step
        except ValueError as error:  # the step kind's own range
            raise UserInputError(f"sampling.{error}") from None
        _check(
            1 <= self.window_size <= self.last_noisy_step + 1,
            f"sampling.window_size ({self.window_size}) must be between 1 and {self.last_noisy_step + 1}, the steps "
            f"with noise of {self.num_steps} {self.step_kind!r} steps; lower window_size or raise num_steps",
        )
        if self.window_range is None:
            object.__setattr__(self, "window_range", (0, self.last_noisy_step + 1))
        _check(len(self.window_range) == 2, f"sampling.window_range must be [lo, hi], got {self.window_range}")
        lo, hi = self.window_range
        _check(
            0 <= lo < hi <= self.num_steps and hi - lo >= self.window_size,
            f"sampling.window_range {tuple(self.window_range)} must satisfy 0 <= lo < hi <= num_steps "
            f"({self.num_steps}) and hold window_size ({self.window_size}) steps",
        )
        _check(
            hi <= self.last_noisy_step + 1,
            f"sampling.window_range {tuple(self.window_range)} lets the window reach step {self.num_steps - 1}, whose "
            f"{self.step_kind!r} transition ends at sigma 0 with no noise (no log-prob, no gradient); "
            f"use window_range [{min(lo, self.last_noisy_step + 1 - self.window_size)}, {self.last_noisy_step + 1}]",
        )
        object.__setattr__(self, "window_range", (int(lo), int(hi)))
        _check(
            self.rollout_max_batch is None or self.rollout_max_batch >= 1,
            f"sampling.rollout_max_batch must be >= 1 or null, got {self.rollout_max_batch}",
        )
        _check(self.decode_batch_size >= 1, f"sampling.decode_batch_size must be >= 1, got {self.decode_batch_size}")


BALANCE_SCOPES = ("rank", "global", "minibatch")


@dataclass(frozen=True)
class CreditConfig:
    """How rewards become per-step rewards and advantages.

    Args:
        method: the credit rule of a GRPO algorithm (`tpgrpo.maths.credit.CREDITS`): "tp" (turning points)
            or "outcome" (every step gets R_W); None takes the algorithm's own ("tp" for tp-grpo,
            "outcome" for flow-grpo). Not for diffusion-nft.
        eta: scale of the long-term reward given at turning points.
        balance: balance turning points of rising and falling trajectories.
        balance_scope: "rank" (spec: over each rank's batch), "global" (over all ranks' batches) or
            "minibatch" (the research code's: it balances each sampling mini-batch on each GPU; here each
            run of ``balance_minibatch`` images of a rank's batch taken one per prompt group in turn,
            so that a mini-batch mixes prompts as the research code's shuffled ones do).
        balance_minibatch: images per balanced mini-batch with ``balance_scope: minibatch`` (the research
            code's per-GPU sampling batch).
        branch_steps: approximation, off (None) by default: complete branches with this many ODE steps.
        advantage_clip: advantages are clamped to ``±advantage_clip``.
        advantage_eps: added to the group std.
        global_std: normalise advantages by the std of the whole batch instead of each group's.
    """

    method: Union[str, None] = None
    eta: float = 1.0
    balance: bool = True
    balance_scope: str = "rank"
    balance_minibatch: Union[int, None] = None
    branch_steps: Union[int, None] = None
    advantage_clip: float = 5.0
    advantage_eps: float = 1e-4
    global_std: bool = False

    def __post_init__(self) -> None:
        _check(
            self.method is None or self.method in CREDITS, f"credit.method must be one of {sorted(CREDITS)}, got {self.method!r}"
        )
        _check(_finite(self.eta) and self.eta >= 0, f"credit.eta must be >= 0 and finite, got {self.eta}")
        _check(
            self.balance_scope in BALANCE_SCOPES,
            f"credit.balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}",
        )
        _check(
            (self.balance_scope == "minibatch") == (self.balance_minibatch is not None),
            "credit.balance_minibatch (images per balanced mini-batch) goes with balance_scope: minibatch, and only "
            f"with it; got balance_scope {self.balance_scope!r} and balance_minibatch {self.balance_minibatch}",
        )
        _check(
            self.balance_minibatch is None or self.balance_minibatch >= 1,
            f"credit.balance_minibatch must be >= 1, got {self.balance_minibatch}",
        )
        _check(
            self.branch_steps is None or self.branch_steps >= 1,
            f"credit.branch_steps must be >= 1 or null, got {self.branch_steps}",
        )
        _check(self.advantage_clip > 0, f"credit.advantage_clip must be > 0, got {self.advantage_clip}")
        _check(
            self.advantage_eps > 0,
            f"credit.advantage_eps must be > 0 (it keeps a constant group finite), got {self.advantage_eps}",
        )


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT's own setting (``model.algorithm: diffusion-nft``; `tpgrpo.algorithms.nft`).

    Args:
        beta: how far the implicit positive and negative policies step from the old one
            (``v± = v_old ± beta (v − v_old)``); the loss is divided by it.
        guidance_scale: the guidance of DiffusionNFT's rollouts and of the velocity it trains; 1 (the
            paper's CFG-free training) makes one transformer evaluation per step. It replaces
            ``sampling.guidance_scale`` for this algorithm; evaluation keeps ``evaluation.guidance_scale``.
    """

    beta: float = 1.0
    guidance_scale: float = 1.0

    def __post_init__(self) -> None:
        _check(_finite(self.beta) and self.beta > 0, f"nft.beta must be > 0 and finite, got {self.beta}")
        _check(
            _finite(self.guidance_scale) and self.guidance_scale >= 0,
            f"nft.guidance_scale must be >= 0 and finite, got {self.guidance_scale}",
        )


@dataclass(frozen=True)
class UpdateConfig:
    """The clipped GRPO update over one rollout batch.

    Args:
        policy_loss: the GRPO algorithms' loss of the probability ratio (`tpgrpo.maths.credit.POLICY_LOSSES`):
            "ppo-clip" (spec §4).
        clip_range: PPO ratio clip ``ε``.
        kl_beta: weight ``β`` of the KL to the reference (the base model, adapter disabled).
        optimizer_steps_per_batch: optimizer steps over one rollout batch (its samples split evenly).
        train_micro_batch: images per micro-batch of the update (None: a whole part).
        max_latents_per_call: most (image, transition) pairs per transformer call of the update;
            a micro-batch's pairs are split into calls of at most this many, each with its own
            backward pass (None: all of a micro-batch's pairs, every trained transition, in one call).
        max_grad_norm: gradient-norm clip.
        gradient_checkpointing: recompute transformer blocks in the backward pass to save memory.
        max_bad_steps: consecutive steps with NaN/inf rewards, losses or gradients tolerated
            (each is skipped with a warning) before training stops with an error.
    """

    policy_loss: str = "ppo-clip"
    clip_range: float = 1e-5
    kl_beta: float = 1e-4
    optimizer_steps_per_batch: int = 2
    train_micro_batch: Union[int, None] = None
    max_latents_per_call: Union[int, None] = None
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    max_bad_steps: int = 5

    def __post_init__(self) -> None:
        _check(
            self.policy_loss in POLICY_LOSSES,
            f"update.policy_loss must be one of {sorted(POLICY_LOSSES)}, got {self.policy_loss!r}",
        )
        _check(0 < self.clip_range < 1, f"update.clip_range (PPO ε) must be in (0, 1), got {self.clip_range}")
        _check(_finite(self.kl_beta) and self.kl_beta >= 0, f"update.kl_beta must be >= 0 and finite, got {self.kl_beta}")
        _check(
            self.optimizer_steps_per_batch >= 1,
            f"update.optimizer_steps_per_batch must be >= 1, got {self.optimizer_steps_per_batch}",
        )
        _check(
            self.train_micro_batch is None or self.train_micro_batch >= 1,
            f"update.train_micro_batch must be >= 1 or null, got {self.train_micro_batch}",
        )
        _check(
            self.max_latents_per_call is None or self.max_latents_per_call >= 1,
            f"update.max_latents_per_call must be >= 1 or null, got {self.max_latents_per_call}",
        )
        _check(self.max_grad_norm > 0, f"update.max_grad_norm must be > 0, got {self.max_grad_norm}")
        _check(self.max_bad_steps >= 0, f"update.max_bad_steps must be >= 0, got {self.max_bad_steps}")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW over the LoRA weights and a linear warm-up.

    Args:
        learning_rate: AdamW learning rate.
        betas: AdamW ``(beta1, beta2)``.
        weight_decay: AdamW weight decay.
        eps: AdamW epsilon.
        warmup_steps: linear learning-rate warm-up in optimizer steps (0: constant).
    """

    learning_rate: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(
            _finite(self.learning_rate) and self.learning_rate > 0,
            f"optimizer.learning_rate must be > 0 and finite, got {self.learning_rate}",
        )
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optimizer.betas must be two numbers in [0, 1), got {tuple(self.betas)}",
        )
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        _check(self.weight_decay >= 0, f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.eps > 0, f"optimizer.eps must be > 0, got {self.eps}")
        _check(self.warmup_steps >= 0, f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")

    def build(self, parameters: Sequence[torch.nn.Parameter]) -> dict[str, Any]:
        """AdamW over ``parameters`` and its per-step warm-up schedule, as Lightning's ``configure_optimizers`` returns them."""
        optimizer = torch.optim.AdamW(
            parameters, lr=self.learning_rate, betas=tuple(self.betas), weight_decay=self.weight_decay, eps=self.eps
        )
        warmup = self.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@dataclass(frozen=True)
class LoRAConfig:
    """The trained adapter.

    Args:
        rank: LoRA rank.
        alpha: LoRA scale (the update is scaled by alpha / rank).
        targets: module names to adapt; None uses the model family's attention projections.
    """

    rank: int = 32
    alpha: float = 64.0
    targets: Union[list[str], None] = None

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        _check(_finite(self.alpha) and self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(
            self.targets is None or (len(self.targets) > 0 and all(isinstance(t, str) for t in self.targets)),
            f"lora.targets must be null or a non-empty list of module names, got {self.targets}",
        )


@dataclass(frozen=True)
class EvaluationConfig:
    """Validation, test and predict sampling (deterministic ODE).

    Args:
        num_steps: ODE steps for validation / test / predict.
        guidance_scale: guidance for validation / test / predict.
        predict_dir: where ``predict`` writes its images.
    """

    num_steps: int = 10
    guidance_scale: float = 4.5
    predict_dir: str = "outputs/predict"

    def __post_init__(self) -> None:
        _check(self.num_steps >= 1, f"evaluation.num_steps must be >= 1, got {self.num_steps}")
        _check(
            _finite(self.guidance_scale) and self.guidance_scale >= 0,
            f"evaluation.guidance_scale must be >= 0 (1 disables guidance), got {self.guidance_scale}",
        )


ATTENTION_BACKENDS_HELP = "native (torch SDPA), or a diffusers backend such as flash (needs flash-attn) or _native_flash"
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ComputeConfig:
    """How the transformer runs: compiler and attention kernels (`tpgrpo.acceleration`).

    Args:
        compile: ``torch.compile`` each transformer block (regional compilation: the first
            calls of each shape compile; needs a C++ compiler on CPU, Triton on CUDA).
        compile_mode: ``torch.compile``'s mode (None: its default).
        attention_backend: diffusers' attention backend of the transformer's attention layers:
            "native" (torch's scaled-dot-product attention, which picks flash / memory-efficient
            kernels on GPUs by itself), "flash" (needs the flash-attn package), "_native_flash",
            "_native_efficient", "_native_cudnn", "sage", "xformers", ... (`diffusers.attention_dispatch`).
            Families whose attention processor does not dispatch through diffusers (SD3 in this
            diffusers) accept only "native".
    """

    compile: bool = False
    compile_mode: Union[str, None] = None
    attention_backend: str = "native"

    def __post_init__(self) -> None:
        _check(self.compile_mode in COMPILE_MODES, f"compute.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = sorted(b.value for b in AttentionBackendName)
        _check(
            self.attention_backend in known,
            f"compute.attention_backend must be {ATTENTION_BACKENDS_HELP}; got {self.attention_backend!r} (known: {', '.join(known)})",
        )


@dataclass(frozen=True)
class PromptCacheConfig:
    """Text embeddings of every prompt of the run, encoded once (`tpgrpo.training.embedding_cache`).

    Args:
        enabled: at the start of fit / validate / test / predict, encode the stage's prompt files
            (each rank a share), keep the embeddings on disk and read them from there.
        folder: where the cache lives (a sub-folder per model and prompts).
        release_text_encoders: then move the text encoders off the accelerator for the rest of the run.
        batch_size: prompts per text-encoder call while building the cache.
    """

    enabled: bool = False
    folder: str = ".cache/tpgrpo/embeddings"
    release_text_encoders: bool = True
    batch_size: int = 64

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"prompt_cache.batch_size must be >= 1, got {self.batch_size}")
        _check(bool(str(self.folder).strip()), "prompt_cache.folder must be a folder path")


RewardsSetting = dict[str, Union[float, dict[str, Any]]]
DEFAULT_REWARDS: RewardsSetting = {"shapes": 1.0}


def parse_rewards(rewards: Mapping[str, Any] | None) -> list[RewardSpec]:
    """``{name: weight}`` or ``{name: {weight: w, <option>: value, ...}}`` -> checked `RewardSpec` list.

    A weight must be a finite number and at least one must be non-zero: a NaN weight would skip
    every step, and all-zero weights train on nothing.
    """
    rewards = DEFAULT_REWARDS if rewards is None else rewards
    _check(isinstance(rewards, Mapping) and len(rewards) > 0, "rewards must name at least one reward, e.g. {shapes: 1.0}")
    weights, options = {}, {}
    for name, value in rewards.items():
        if isinstance(value, Mapping):
            options[name] = dict(value)
            _check("weight" in options[name], f"rewards.{name} needs a weight, e.g. {{{name}: {{weight: 1.0, ...options}}}}")
            weights[name] = options[name].pop("weight")
        else:
            weights[name], options[name] = value, {}
    checked = validate_reward_weights(weights)
    return [RewardSpec(name, weight, options[name]) for name, weight in checked.items()]


EvalRewardsSetting = dict[str, Union[dict[str, Any], None]]


def parse_eval_rewards(eval_rewards: Mapping[str, Any] | None, training: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """``{name: {option: value}}`` (``{}`` or null: the reward's defaults) -> checked ``{name: options}``.

    Rewards scored only in validation and test. A reward that is also a training reward is left out:
    the training reward's scores are logged under the same names already.
    """
    from tpgrpo.rewards import REWARDS

    if eval_rewards is None:
        return {}
    _check(isinstance(eval_rewards, Mapping), f"eval_rewards must map reward names to their options, got {eval_rewards!r}")
    checked: dict[str, dict[str, Any]] = {}
    for name, options in eval_rewards.items():
        _check(
            options is None or isinstance(options, Mapping),
            f"eval_rewards.{name} must be a mapping of the reward's options ({{}} for its defaults), got {options!r}",
        )
        _check(
            name in REWARDS or ":" in name,
            f"eval_rewards.{name}: unknown reward; available: {', '.join(REWARDS)}, or package.module:Class",
        )
        if name not in training:
            checked[str(name)] = dict(options or {})
    return checked


GROUPS: dict[str, type] = {
    "sampling": SamplingConfig,
    "credit": CreditConfig,
    "nft": NFTConfig,
    "update": UpdateConfig,
    "optimizer": OptimizerConfig,
    "lora": LoRAConfig,
    "evaluation": EvaluationConfig,
    "compute": ComputeConfig,
    "prompt_cache": PromptCacheConfig,
}
G = TypeVar("G")


def as_group(cls: type[G], value: Any) -> G:
    """A group from itself, a mapping (e.g. a checkpoint's saved hyper-parameters) or None (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    group = next(name for name, kind in GROUPS.items() if kind is cls)
    if hasattr(value, "__dict__") and not isinstance(value, Mapping):
        value = vars(value)  # a jsonargparse Namespace
    _check(isinstance(value, Mapping), f"{group} must be a mapping of settings, got {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    _check(not unknown, f"{group}.{unknown[0] if unknown else ''} is not a setting; known: {', '.join(sorted(known))}")
    return cls(**dict(value))


def group_dicts(**groups: Any) -> dict[str, dict[str, Any]]:
    """Plain dictionaries of the groups (what checkpoints store as hyper-parameters)."""
    return {name: asdict(group) for name, group in groups.items()}


def check_model_settings(model: Mapping[str, Any] | Any) -> None:
    """Range-check every group and the rewards of a parsed ``model:`` section (no weights loaded)."""
    if hasattr(model, "__dict__") and not isinstance(model, Mapping):
        model = vars(model)
    for name, cls in GROUPS.items():
        as_group(cls, model.get(name))
    training = [spec.name for spec in parse_rewards(model.get("rewards"))]
    parse_eval_rewards(model.get("eval_rewards"), training)
    from tpgrpo.families import PIPELINE_FAMILIES

    families = sorted(cls.family for cls in PIPELINE_FAMILIES.values())
    family = model.get("family", "auto")
    _check(family == "auto" or family in families, f"family must be auto or one of {families}, got {family!r}")
    _check(int(model.get("max_sequence_length", 1)) >= 1, "max_sequence_length must be >= 1")
    parse_dtype(model.get("weights_dtype", "float32"))


DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name ("bfloat16" / "bf16", "float16" / "fp16", "float32" / "fp32")."""
    if isinstance(name, torch.dtype):
        return name
    _check(str(name) in DTYPES, f"weights_dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[str(name)]


def build_rewards(specs: Sequence[RewardSpec]):
    """The weighted reward (`tpgrpo.rewards.WeightedReward`) of the `parse_rewards` result ``specs``."""
    return _built(specs)


def build_eval_rewards(options: Mapping[str, Mapping[str, Any]]):
    """The evaluation rewards of a `parse_eval_rewards` result, as one `WeightedReward` (weights 1)."""
    return _built([RewardSpec(name, 1.0, dict(o or {})) for name, o in options.items()])


def _built(specs: Sequence[RewardSpec]):
    from tpgrpo.rewards import build_reward

    try:
        return build_reward(specs)
    except ValueError as error:
        raise UserInputError(str(error)) from None
