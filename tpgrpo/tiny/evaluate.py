"""Score a text-to-image pipeline on held-out shapes prompts with the shapes reward.

    python -m tpgrpo.tiny.evaluate --model tpgrpo/tiny/model --prompts data/shapes/test.jsonl --seeds 4

``--binding`` also checks whether the model binds colours to shapes at all (`binding_sensitivity`):
RL can sharpen a capability the base model has in part, not create one it lacks.

Every prompt is sampled with seeds 0..S-1 (deterministic Euler ODE sampling, one noise
generator per image, batched). Standard errors are over prompts: each prompt's mean over its
seeds is one observation, since images of one prompt are not independent.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tpgrpo.rewards.shapes import ShapesReward, check_record, detect
from tpgrpo.tiny.components import DEFAULT_MODEL_DIR, MAX_SEQUENCE_LENGTH, load_pipeline
from tpgrpo.tiny.scenes import make_prompt, read_jsonl
from tpgrpo.training.evaluation import mean_and_stderr


@torch.no_grad()
def sample(
    pipe, prompts: Sequence[str], seeds: Sequence[int], steps: int = 10, guidance: float = 4.5, batch: int = 128
) -> torch.Tensor:
    """Images for every (prompt, seed), prompt-major: float (len(prompts) * len(seeds), 3, H, W) in [0, 1]."""
    jobs = [(p, s) for p in prompts for s in seeds]
    images = []
    for i in tqdm(range(0, len(jobs), batch), desc="sample", leave=False):
        chunk = jobs[i : i + batch]
        images.append(
            pipe(
                prompt=[p for p, _ in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                output_type="pt",
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            ).images.float()
        )
    return torch.cat(images)


def summarize(scores: Mapping[str, torch.Tensor], tags: Sequence[str], n_seeds: int) -> dict:
    """Mean and standard error over prompts of each score, overall and per tag.

    ``scores`` holds (P * n_seeds,) tensors, prompt-major; ``tags`` the P prompts' tags.
    Returns {"all": {"n_prompts", key: {"mean", "se"}}, "<tag>": {...}}.
    """
    with warnings.catch_warnings():  # checks a prompt does not have are NaN for all its seeds
        warnings.simplefilter("ignore", RuntimeWarning)
        per_prompt = {k: np.nanmean(v.numpy().reshape(len(tags), n_seeds), axis=1) for k, v in scores.items()}
    groups = {"all": np.ones(len(tags), dtype=bool)}
    groups.update({t: np.array([x == t for x in tags]) for t in sorted(set(tags))})
    out = {}
    for name, mask in groups.items():
        row: dict = {"n_prompts": int(mask.sum())}
        for key, values in per_prompt.items():
            v = values[mask][~np.isnan(values[mask])]
            if len(v):
                mean, se = mean_and_stderr(torch.from_numpy(v))
                row[key] = {"mean": mean, "se": se}
        out[name] = row
    return out


def evaluate(
    pipe, records: Sequence[Mapping], seeds: Sequence[int], steps: int = 10, guidance: float = 4.5, batch: int = 128
) -> tuple[dict, torch.Tensor]:
    """(summary as in `summarize`, images (P * S, 3, H, W)) of ``pipe`` on ``records`` x ``seeds``."""
    images = sample(pipe, [r["prompt"] for r in records], seeds, steps, guidance, batch)
    metadata = [r for r in records for _ in seeds]
    prompts = [r["prompt"] for r in metadata]
    scores = ShapesReward()(images, prompts, metadata)
    # the demo's training reward (configs/tiny.yaml): clutter scales the score down
    scores["shapes_extra_factor"] = ShapesReward(extra_as_factor=True)(images, prompts, metadata)["shapes"]
    return summarize(scores, [r.get("tag", "untagged") for r in records], len(seeds)), images


def swap_colors(record: Mapping) -> dict | None:
    """The record of two objects of different classes with their colours exchanged, or None if there is none.

    "a blue square and a green triangle" -> "a green square and a blue triangle" (positions kept).
    """
    include = record.get("include", [])
    if len(include) != 2 or any("color" not in e for e in include):
        return None
    first, second = include
    if first["class"] == second["class"] or first["color"] == second["color"]:
        return None
    swapped = copy.deepcopy(dict(record))
    swapped["include"][0]["color"], swapped["include"][1]["color"] = second["color"], first["color"]
    swapped["prompt"] = make_prompt(swapped)
    return swapped


def binding_sensitivity(
    pipe, records: Sequence[Mapping], seeds: Sequence[int], steps: int = 10, guidance: float = 4.5, batch: int = 128
) -> dict:
    """Does the model draw the colours where the prompt puts them? Images of each two-colour prompt and of its
    colour-swapped twin (`swap_colors`), same seeds, each scored against both records.

    Returns ``n_prompts``, ``binding_own`` (mean binding check of the images against their own records),
    ``binding_swapped`` (against the twin's record) and ``pixel_change`` (mean absolute difference of the
    two prompts' images). A model that ignores which colour goes with which shape scores the two alike.
    """
    pairs = [(r, t) for r in records if (t := swap_colors(r)) is not None]
    if not pairs:
        raise ValueError("no record has two objects of different classes and colours")
    originals, twins = [r for r, _ in pairs], [t for _, t in pairs]
    images = [sample(pipe, [r["prompt"] for r in group], seeds, steps, guidance, batch) for group in (originals, twins)]
    # detection does not depend on the record: detect once per set of images, check against both records
    detections = [detect(image, **ShapesReward().options) for image in images]

    def binding(objects: Sequence[Sequence], group: Sequence[Mapping]) -> float:
        records = [r for r in group for _ in seeds]
        return float(np.mean([np.mean(check_record(o, r)["binding"]) for o, r in zip(objects, records)]))

    own = (binding(detections[0], originals) + binding(detections[1], twins)) / 2
    swapped = (binding(detections[0], twins) + binding(detections[1], originals)) / 2
    change = float((images[0] - images[1]).abs().mean())
    return {"n_prompts": len(pairs), "binding_own": own, "binding_swapped": swapped, "pixel_change": change}


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 2) -> None:
    """Write images (N, 3, H, W) in [0, 1] as a PNG grid with ``columns`` columns, upscaled ``scale``x."""
    n, _, h, w = images.shape
    rows = math.ceil(n / columns)
    canvas = torch.ones(rows * columns, 3, h, w)
    canvas[:n] = images.cpu()
    grid = canvas.view(rows, columns, 3, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, 3)
    picture = Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy())
    picture.resize((columns * w * scale, rows * h * scale), Image.NEAREST).save(path)


def format_summary(summary: Mapping) -> str:
    """One line per group: dense and strict scores with standard errors."""
    lines = []
    for name, row in summary.items():
        parts = [f"{name:>14} ({row['n_prompts']:3d} prompts)"]
        for key in ("shapes", "shapes_extra_factor", "shapes/strict"):
            if key in row:
                parts.append(f"{key} {row[key]['mean']:.3f} ± {row[key]['se']:.3f}")
        lines.append("  ".join(parts))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--prompts", type=Path, default=Path("data/shapes/test.jsonl"))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--shift", type=float, default=None, help="override the scheduler's shift")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG of the first seed's images")
    parser.add_argument("--binding", action="store_true", help="also check colour binding with colour-swapped prompts")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.shift is not None:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=args.shift)
    records = read_jsonl(args.prompts)
    summary, images = evaluate(pipe, records, list(range(args.seeds)), args.steps, args.guidance, args.batch)
    print(format_summary(summary))
    if args.binding and not any(swap_colors(r) for r in records):
        print(f"binding: {args.prompts} has no prompt of two objects with different classes and colours to check")
    elif args.binding:
        summary["binding_sensitivity"] = binding_sensitivity(
            pipe, records, list(range(args.seeds)), args.steps, args.guidance, args.batch
        )
        b = summary["binding_sensitivity"]
        print(f"binding ({b['n_prompts']} two-colour prompts and their colour-swapped twins): against own records "
              f"{b['binding_own']:.3f}, against the twins' {b['binding_swapped']:.3f}; images change by "
              f"{b['pixel_change']:.3f} (mean absolute pixel difference)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **summary}, indent=2))
    if args.grid:
        save_grid(images[:: args.seeds], args.grid, columns=16)


if __name__ == "__main__":
    main()
