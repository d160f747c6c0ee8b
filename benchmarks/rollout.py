"""Benchmark: the research rollout schedule (`rollout_sequential`) against the engine (`rollout`).

Both produce the same TP-GRPO rollout (main trajectory, ODE baseline, W-1 branches) from the same
noise; this measures, in one run, their wall clock, NFE per image, transformer calls, peak memory
and images per second, and checks that their final latents agree. Cases:

* ``tiny``: the embedded tiny SD3-architecture model (``tpgrpo/tiny/model``; random weights of
  the same builder when it is not there, recorded in the JSON) at its native 32 px, one prompt,
  ``--group`` images, CFG ``--cfg``.
* ``sd3.5-medium-shaped``: an `SD3Transformer2DModel` with the architecture config of
  stabilityai/stable-diffusion-3.5-medium and random weights (no download), random text
  embeddings of the real shapes (333 tokens x 4096, pooled 2048). On CPU its depth, resolution
  and group are cut down (``--sd3-layers``, ``--sd3-resolution``, ``--sd3-group``); on CUDA the
  defaults are the real model at 512 px in bf16.
* ``agreement``: the ``branch_steps`` approximation (fewer-step ODE completions) on the tiny
  model: its NFE, and how its turning points (`tpgrpo.maths.credit.turning_points`) agree with the
  exact ones under the shapes reward.

Times are the best of ``--repeats`` runs, sequential and engine alternating; besides the wall
clock the process's CPU time is recorded, which other jobs on a shared CPU disturb less.
"images/s" counts rollout images (the B images of the group, each with its W+1 completions).
Peak memory is the increase of the peak over the memory in use before the run: CUDA allocator
peak, or on CPU the process's peak resident set (``VmHWM`` in /proc, reset before each run).

    python benchmarks/rollout.py                 # CPU defaults, a few minutes on 2 cores
    python benchmarks/rollout.py --device cuda   # real SD3.5-M shape at 512 px, bf16

Writes ``benchmarks/results/rollout.json`` and prints one summary line.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import torch
import transformers
from torch import Tensor

from tpgrpo.algorithms import FlowAlgorithm
from tpgrpo.families import FlowModel, PromptEmbeds, SD3Model
from tpgrpo.families.sd3 import SD35_MEDIUM_TRANSFORMER
from tpgrpo.maths.rollout import Rollout, VelocityFn, minimum_nfe, rollout, rollout_sequential, sequential_nfe
from tpgrpo.maths.sde import step_kind
from tpgrpo.settings import SamplingConfig, UpdateConfig

sys.path.append(str(Path(__file__).resolve().parent.parent))  # the benchmarks package, also when run as a script
from benchmarks.cpuinfo import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "rollout.json"
SD35_TEXT_TOKENS = 333  # 77 CLIP tokens + 256 T5 tokens
SD35_VAE_FACTOR = 8
SD3_SHIFT = 3.0


def sd35_medium_config(layers: int, sample_size: int | None = None) -> dict:
    """SD3.5-Medium's transformer config (`tpgrpo.families.sd3`) cut to its first ``layers`` blocks."""
    config = dict(SD35_MEDIUM_TRANSFORMER, num_layers=layers)
    config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < layers)
    if sample_size is not None:
        config["sample_size"] = sample_size
    return config


# ---------------------------------------------------------------- measurement


def machine(device: torch.device) -> dict:
    """Where the numbers come from: CPU model or GPU name, library versions, date."""
    info = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _rss_kib(field: str) -> int:
    found = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(found.group(1))


def _release_freed_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so resident memory counts live objects only."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measured increase can only be smaller
        pass


def start_peak_memory(device: torch.device) -> int:
    """Reset the peak-memory counter of ``device`` and return the bytes in use now (CUDA allocator,
    or on CPU the process's resident set after giving freed heap back)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _release_freed_heap()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (Linux)
    return _rss_kib("VmRSS") * 1024


def peak_memory_increase_mib(device: torch.device, before: int) -> float:
    """The peak since `start_peak_memory` over the ``before`` it returned, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return (peak - before) / 2**20


def measure(run: Callable[[], Rollout], device: torch.device) -> tuple[Rollout, dict[str, float]]:
    """Run once; return its result and ``seconds`` (wall clock), ``cpu_seconds`` (this process's
    CPU time, less sensitive than the wall clock to other jobs on a shared CPU) and
    ``peak_memory_mib`` (peak memory increase)."""
    before = start_peak_memory(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return result, {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_memory_mib": peak_memory_increase_mib(device, before)}


def compare_schedules(
    velocity_fn: VelocityFn,
    latents: Tensor,
    sigmas: Tensor,
    args: argparse.Namespace,
    repeats: int,
    max_batch: int | None,
) -> dict:
    """Time `rollout_sequential` and `rollout` on the same rollout (same noise), best of ``repeats``."""
    common = dict(
        initial_latents=latents, sigmas=sigmas, window_start=args.window_start, window_size=args.window,
        step=step_kind(args.kind, args.noise_level),
    )
    runs = {
        "sequential": lambda: rollout_sequential(
            velocity_fn, generator=torch.Generator(latents.device).manual_seed(args.seed), **common
        ),
        "engine": lambda: rollout(
            velocity_fn, generator=torch.Generator(latents.device).manual_seed(args.seed), max_batch=max_batch, **common
        ),
    }
    with torch.no_grad():  # warm-up
        velocity_fn(latents, float(sigmas[0]), torch.arange(latents.shape[0], device=latents.device))
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    results: dict[str, Rollout] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name], numbers = measure(run, latents.device)
            measured[name].append(numbers)
    group = latents.shape[0]
    out = {}
    for name in runs:
        seconds = [m["seconds"] for m in measured[name]]
        out[name] = {
            "seconds": min(seconds),
            "all_seconds": [round(s, 4) for s in seconds],
            "cpu_seconds": min(m["cpu_seconds"] for m in measured[name]),
            "nfe_per_image": results[name].nfe_per_image,
            "transformer_calls": results[name].transformer_calls,
            "peak_memory_mib": max(m["peak_memory_mib"] for m in measured[name]),
            "images_per_second": group / min(seconds),
        }
    out["speedup"] = out["sequential"]["seconds"] / out["engine"]["seconds"]
    out["cpu_time_speedup"] = out["sequential"]["cpu_seconds"] / out["engine"]["cpu_seconds"]
    out["nfe_ratio"] = out["sequential"]["nfe_per_image"] / out["engine"]["nfe_per_image"]
    reference, engine = results["sequential"], results["engine"]
    out["max_abs_diff"] = {
        "final_latents": (reference.final_latents - engine.final_latents).abs().max().item(),
        "states": (reference.states - engine.states).abs().max().item(),
        "log_probs": (reference.log_probs - engine.log_probs).abs().max().item(),
    }
    return out


# ---------------------------------------------------------------- models


def load_tiny(device: torch.device) -> tuple[FlowModel, str]:
    """The shipped tiny model, or the same builder's random weights when it is absent."""
    from tpgrpo.tiny import DEFAULT_MODEL_DIR, MAX_SEQUENCE_LENGTH, build_pipeline, load_pipeline

    if (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        pipe, weights = load_pipeline(DEFAULT_MODEL_DIR), "pretrained (tpgrpo/tiny/model)"
    else:
        pipe, weights = build_pipeline(), "random: tpgrpo/tiny/model not found, build_pipeline() used"
    return FlowModel.from_pipeline(pipe.to(device), max_sequence_length=MAX_SEQUENCE_LENGTH), weights


def training_velocity(flow: FlowModel, cond: PromptEmbeds, guidance_scale: float, uncond: PromptEmbeds | None = None) -> VelocityFn:
    """The velocity function training rolls out with (`tpgrpo.algorithms.FlowAlgorithm.velocity_fn`, CFG inside)."""
    step = FlowAlgorithm(flow, flow.transformer, reward=None, sampling=SamplingConfig(), update=UpdateConfig())
    return step.velocity_fn(cond, guidance_scale, uncond)


def flow_velocity(flow: FlowModel, prompts: Sequence[str], guidance_scale: float) -> VelocityFn:
    """`training_velocity` of ``prompts`` (one per image), the empty prompt as the unconditional one."""
    return training_velocity(flow, flow.encode(list(prompts)), guidance_scale)


def velocity_only_sd3(transformer: torch.nn.Module, shift: float) -> FlowModel:
    """An `SD3Model` around a bare transformer (no VAE or text encoders: the conditioning is given)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    parts = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift), **dict.fromkeys(parts)
    )
    return SD3Model(pipe)


def native_resolution(flow: FlowModel) -> int:
    """The image side the transformer was built for, in pixels."""
    return flow.transformer.config.sample_size * flow.vae_scale_factor


def initial_latents(flow: FlowModel, batch: int, seed: int) -> Tensor:
    """(batch, C, h, w) initial noise at the native resolution, on the model's device."""
    return flow.initial_noise(batch, native_resolution(flow), torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- cases


def tiny_case(args: argparse.Namespace, device: torch.device) -> dict:
    flow, weights = load_tiny(device)
    latents = initial_latents(flow, args.group, args.seed)
    velocity_fn = flow_velocity(flow, ["a photo of two red circles"] * args.group, args.cfg)
    sigmas = flow.sigmas(args.steps).to(device)
    timing = compare_schedules(velocity_fn, latents, sigmas, args, args.repeats, args.max_batch)
    resolution = native_resolution(flow)
    return {"weights": weights, "resolution": resolution, "group": args.group, "dtype": "float32", **timing}


def sd3_case(args: argparse.Namespace, device: torch.device) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if args.sd3_resolution % (SD35_VAE_FACTOR * 2):
        raise ValueError(f"--sd3-resolution must be a multiple of 16, got {args.sd3_resolution}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = sd35_medium_config(args.sd3_layers)
    torch.manual_seed(args.seed)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(dtype).eval().requires_grad_(False)
    generator = torch.Generator(device).manual_seed(args.seed)
    group, side = args.sd3_group, args.sd3_resolution // SD35_VAE_FACTOR
    text = dict(device=device, generator=generator)
    cond = PromptEmbeds(
        torch.randn(group, SD35_TEXT_TOKENS, config["joint_attention_dim"], **text),
        torch.randn(group, config["pooled_projection_dim"], **text),
    )
    uncond = PromptEmbeds(
        torch.randn(1, SD35_TEXT_TOKENS, config["joint_attention_dim"], **text),
        torch.randn(1, config["pooled_projection_dim"], **text),
    ).index(torch.zeros(group, dtype=torch.long))
    velocity_fn = training_velocity(velocity_only_sd3(transformer, SD3_SHIFT), cond, args.cfg, uncond)
    latents = torch.randn(group, config["in_channels"], side, side, **text)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)
    scheduler.set_timesteps(args.steps)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    timing = compare_schedules(velocity_fn, latents, sigmas, args, args.sd3_repeats, args.sd3_max_batch)
    return {
        "weights": "random",
        "num_layers": args.sd3_layers,
        "resolution": args.sd3_resolution,
        "group": group,
        "dtype": str(dtype).removeprefix("torch."),
        "parameters_millions": sum(p.numel() for p in transformer.parameters()) / 1e6,
        **timing,
    }


def completion_rewards(
    flow: FlowModel, reward, final_latents: Tensor, prompts: Sequence[str], metadata: Sequence[dict], batch: int
) -> Tensor:
    """Rewards (B, K) of all completions (B, K, C, h, w), decoded ``batch`` at a time and scored."""
    b, k = final_latents.shape[:2]
    images = flow.decode(final_latents.flatten(0, 1), batch)
    scores = reward(images, [p for p in prompts for _ in range(k)], [m for m in metadata for _ in range(k)])
    return scores["reward"].float().cpu().reshape(b, k)


def turning_point_agreement(exact: Sequence[Tensor], approximate: Sequence[Tensor]) -> dict:
    """How the approximation's turning points match the exact ones.

    ``exact`` and ``approximate`` hold one (B, W+1) reward tensor per rollout batch (balancing
    acts within a batch). Returns the fraction of (image, step) flags that agree, the numbers of
    exact, approximate and common flags with their Jaccard index, the fraction of incremental
    rewards ``d_t`` of the same sign, and the mean absolute reward error of the completions.
    """
    from tpgrpo.maths.credit import turning_points

    agree = total = exact_flags = approx_flags = common = same_sign = 0
    reward_error = []
    for r_exact, r_approx in zip(exact, approximate):
        f_exact, f_approx = turning_points(r_exact, balance=True), turning_points(r_approx, balance=True)
        agree += int((f_exact == f_approx).sum())
        total += f_exact.numel()
        exact_flags += int(f_exact.sum())
        approx_flags += int(f_approx.sum())
        common += int((f_exact & f_approx).sum())
        same_sign += int((torch.sign(r_exact.diff(dim=1)) == torch.sign(r_approx.diff(dim=1))).sum())
        reward_error.append((r_exact - r_approx)[:, :-1].abs().flatten())
    union = exact_flags + approx_flags - common
    return {
        "flag_agreement": agree / total,
        "exact_flags": exact_flags,
        "approx_flags": approx_flags,
        "common_flags": common,
        "jaccard": common / union if union else 1.0,
        "increment_sign_agreement": same_sign / total,
        "completion_reward_mae": torch.cat(reward_error).mean().item(),
    }


def agreement_case(args: argparse.Namespace, device: torch.device) -> dict:
    from tpgrpo.rewards import build_reward
    from tpgrpo.tiny.scenes import split_records

    flow, weights = load_tiny(device)
    reward = build_reward({args.reward: 1.0}).to(device)
    records = split_records(0)[1][: args.agreement_prompts]
    sigmas = flow.sigmas(args.steps).to(device)
    exact_rewards: list[Tensor] = []
    approx_rewards: dict[int, list[Tensor]] = {m: [] for m in args.branch_steps}
    for index, record in enumerate(records):
        prompts, metadata = [record["prompt"]] * args.group, [record] * args.group
        velocity_fn = flow_velocity(flow, prompts, args.cfg)
        latents = initial_latents(flow, args.group, args.seed + index)
        for m in [None, *args.branch_steps]:
            result = rollout(
                velocity_fn, latents, sigmas, args.window_start, args.window, step_kind(args.kind, args.noise_level),
                generator=torch.Generator(device).manual_seed(args.seed + index), branch_steps=m,
            )
            scores = completion_rewards(flow, reward, result.final_latents, prompts, metadata, args.decode_batch)
            (exact_rewards if m is None else approx_rewards[m]).append(scores)
    return {
        "weights": weights,
        "reward": args.reward,
        "prompts": len(records),
        "group": args.group,
        "exact_nfe_per_image": minimum_nfe(args.steps, args.window_start, args.window),
        "branch_steps": {
            str(m): {
                "nfe_per_image": minimum_nfe(args.steps, args.window_start, args.window, branch_steps=m),
                "sequential_nfe_per_image": sequential_nfe(args.steps, args.window_start, args.window, branch_steps=m),
                **turning_point_agreement(exact_rewards, approx_rewards[m]),
            }
            for m in args.branch_steps
        },
    }


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10, help="T")
    parser.add_argument("--window", type=int, default=9, help="W")
    parser.add_argument("--window-start", type=int, default=0, help="s")
    parser.add_argument("--noise-level", type=float, default=0.7)
    parser.add_argument("--kind", default="cps", choices=("cps", "sde"))
    parser.add_argument("--cfg", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--group", type=int, default=8, help="images per prompt (tiny case and agreement)")
    parser.add_argument("--max-batch", type=int, default=None, help="engine micro-batch, tiny case")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats, tiny case (best is kept)")
    parser.add_argument("--sd3-layers", type=int, default=None, help="default: 2 on CPU, 24 on CUDA")
    parser.add_argument("--sd3-resolution", type=int, default=None, help="pixels; default: 128 on CPU, 512 on CUDA")
    parser.add_argument("--sd3-group", type=int, default=None, help="default: 2 on CPU, --group on CUDA")
    parser.add_argument("--sd3-repeats", type=int, default=None, help="default: 1 on CPU, 3 on CUDA")
    parser.add_argument("--sd3-max-batch", type=int, default=None, help="engine micro-batch, SD3 case")
    parser.add_argument("--reward", default="shapes", help="registered reward for the agreement case")
    parser.add_argument("--agreement-prompts", type=int, default=24)
    parser.add_argument("--branch-steps", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 3, 5])
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--cases", default="tiny,sd3,agreement", help="comma-separated subset of tiny,sd3,agreement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    defaults = dict(sd3_layers=(24, 2), sd3_resolution=(512, 128), sd3_group=(args.group, 2), sd3_repeats=(3, 1))
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    args.cases = args.cases.split(",")
    unknown = set(args.cases) - {"tiny", "sd3", "agreement"}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    return args


def summary(results: dict) -> str:
    """One line: per timed case the sequential and engine times, NFE and speed-up; agreement."""
    parts = []
    for name in ("tiny", "sd3.5-medium-shaped"):
        if name in results["cases"]:
            case = results["cases"][name]
            seq, eng = case["sequential"], case["engine"]
            parts.append(
                f"{name} ({case['resolution']}px, G={case['group']}): sequential {seq['seconds']:.2f}s "
                f"({seq['nfe_per_image']} NFE) -> engine {eng['seconds']:.2f}s ({eng['nfe_per_image']} NFE), "
                f"{case['speedup']:.2f}x (CPU time {case['cpu_time_speedup']:.2f}x)"
            )
    if "agreement" in results["cases"]:
        approx = results["cases"]["agreement"]["branch_steps"]
        parts.append(
            "approximate branches, turning-point Jaccard vs exact: "
            + ", ".join(f"m={m}: {a['jaccard']:.2f} ({a['nfe_per_image']} NFE)" for m, a in approx.items())
        )
    return "rollout benchmark: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = {
        "machine": machine(device),
        "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "nfe_formulas": {
            "sequential": sequential_nfe(args.steps, args.window_start, args.window),
            "engine": minimum_nfe(args.steps, args.window_start, args.window),
        },
        "cases": {},
    }
    if "tiny" in args.cases:
        results["cases"]["tiny"] = tiny_case(args, device)
    if "sd3" in args.cases:
        results["cases"]["sd3.5-medium-shaped"] = sd3_case(args, device)
    if "agreement" in args.cases:
        results["cases"]["agreement"] = agreement_case(args, device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))


if __name__ == "__main__":
    main()
