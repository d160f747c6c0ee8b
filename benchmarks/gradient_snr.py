"""How much learning signal one rollout batch carries: agreement of independent policy gradients.

    python benchmarks/gradient_snr.py [--config configs/tiny.yaml] [--prompts 16] [--batches 4] [--tag position] [-- CLI overrides]

Builds the model of the config (any ``train.py`` override after ``--``), takes ``--prompts``
training prompts (drawn with ``--seed``; only those tagged ``--tag``, if given) × the config's group size, and rolls them out ``--batches`` times with
independent noise. Each batch gives the plain policy gradient of its first optimizer step
(`tpgrpo.algorithms.diagnostics.policy_gradient`); the mean pairwise cosine of those gradients measures
how much of a gradient is signal (see `tpgrpo.algorithms.diagnostics`), and the same with the advantages
shuffled over the batch is the noise floor. Also per trained transition and per LoRA module kind.
Writes ``benchmarks/results/gradient_snr.json`` (or ``--out``) and prints one summary line.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.rollout import machine  # noqa: E402
from tpgrpo.algorithms.diagnostics import (  # noqa: E402
    cosines_by_part,
    lora_module_kind,
    pairwise_cosines,
    policy_gradient,
    reward_spread,
    signal_to_noise,
)
from tpgrpo.cli import build_cli  # noqa: E402
from tpgrpo.lora import named_lora_parameters  # noqa: E402
from tpgrpo.training.data import GroupBatches, PromptSet  # noqa: E402
from tpgrpo.training.evaluation import mean_and_stderr  # noqa: E402  (pairs share batches: a guide to the error, a little low)


def measure(args: argparse.Namespace, overrides: list[str]) -> dict:
    cli = build_cli(["--config", args.config, "--trainer.logger=false", "--trainer.callbacks=[]", *overrides], run=False)
    model, data = cli.model, cli.datamodule
    data.setup("fit")
    prompts = data.prompt_sets["fit"]
    if args.tag:
        keep = [i for i, record in enumerate(prompts.metadata) if record.get("tag") == args.tag]
        prompts = PromptSet(prompts.path, [prompts.prompts[i] for i in keep], [prompts.metadata[i] for i in keep])
    if args.prompts > len(prompts):
        which = f" with tag {args.tag!r}" if args.tag else ""
        raise SystemExit(f"error: --prompts {args.prompts} is more than the {len(prompts)} training prompts{which}")
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(args.seed))[: args.prompts].tolist()
    batch = GroupBatches(prompts, data.hparams.group_size)[[(index, group) for group, index in enumerate(order)]]
    # the layout of the gradient vectors of `policy_gradient`
    names, sizes = zip(*[(name, p.numel()) for name, p in named_lora_parameters(model.transformer)])

    started = time.perf_counter()
    per_batch, shuffled, rewards, spreads = [], [], [], []
    for number in range(args.batches):
        collected = model.collect(batch, ("gradient_snr", args.seed, number))
        per_batch.append(policy_gradient(model, collected))
        permutation = torch.randperm(len(batch["prompts"]), generator=torch.Generator().manual_seed(number))
        shuffled.append(sum(policy_gradient(model, collected, collected.advantages[permutation])))
        rewards.append(float(collected.final_rewards.mean()))
        spreads.append(reward_spread(collected.final_rewards, collected.group_ids))
    seconds = time.perf_counter() - started

    totals = [sum(transitions) for transitions in per_batch]
    cosine, cosine_err = mean_and_stderr(pairwise_cosines(totals))
    floor, floor_err = mean_and_stderr(pairwise_cosines(shuffled))
    images = len(batch["prompts"])
    return {
        "machine": machine(model.device),
        "args": {**vars(args), "overrides": overrides},
        "images_per_batch": images,
        "cosine": cosine,
        "cosine_stderr": cosine_err,
        "noise_floor": floor,
        "noise_floor_stderr": floor_err,
        **signal_to_noise(cosine, images),
        "cosine_by_transition": [
            float(pairwise_cosines([transitions[t] for transitions in per_batch]).mean()) for t in range(len(per_batch[0]))
        ],
        "gradient_norm_by_transition": [
            sum(float(transitions[t].norm()) for transitions in per_batch) / len(per_batch) for t in range(len(per_batch[0]))
        ],
        "cosine_by_module": cosines_by_part(totals, names, sizes, lora_module_kind),
        "cosine_by_block": cosines_by_part(totals, names, sizes, lambda name: name.split(".")[1]),
        "train_reward": rewards,
        "reward_spread": {key: sum(s[key] for s in spreads) / len(spreads) for key in spreads[0]},
        "seconds_per_batch": seconds / args.batches,
    }


def summary_line(result: dict) -> str:
    half = result["images_for_half_signal"]
    return (
        f"policy-gradient cosine {result['cosine']:.3f} ± {result['cosine_stderr']:.3f} between batches of "
        f"{result['images_per_batch']} images (noise floor {result['noise_floor']:.3f} ± {result['noise_floor_stderr']:.3f}): "
        f"signal-to-noise per image {result['snr_per_image']:.1e}, "
        + (f"~{half:,.0f} images for a half-signal gradient" if half != float("inf") else "no signal above the floor")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--prompts", type=int, default=16, help="training prompts per batch (× the config's group size)")
    parser.add_argument("--batches", type=int, default=4, help="independent rollout batches (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="which prompts are drawn")
    parser.add_argument("--tag", default=None, help="only training prompts whose record has this tag (e.g. position)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gradient_snr.json"))
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if args.batches < 2:
        parser.error("--batches must be at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args, overrides)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{summary_line(result)}; {out}")


if __name__ == "__main__":
    main()
