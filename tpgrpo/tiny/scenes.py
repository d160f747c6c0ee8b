"""Synthetic shape scenes and their prompts, in GenEval's metadata format.

A scene is a plain light-grey 32x32 RGB canvas with 1-4 non-overlapping flat shapes (circle,
square, upright triangle) in six colours whose hues are 60 degrees apart, so that they stay
distinguishable after a VAE blurs them. A record is GenEval's jsonl metadata:

    {"tag": "position",
     "include": [{"class": "triangle", "count": 1, "color": "green"},
                 {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}],
     "prompt": "a photo of a blue square to the left of a green triangle"}

``"position": ["left of", 0]`` on ``include[1]`` means "include[1] is left of include[0]".
Counting records also carry GenEval's ``"exclude": [{"class": c, "count": n + 1}]`` (with the
include's colour, if any: "two red circles" excludes a third red circle, not a blue one).
Tags: single_object, two_object, counting, colors, position, color_attr.

Make the prompt files (fixed seed, train and held-out test prompts are disjoint):

    python -m tpgrpo.tiny.scenes --out data/shapes
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from tpgrpo.rewards.shapes import COLORS, SHAPES, validate_record  # the world's vocabulary lives with its reward

PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
NUMBERS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
# Metadata relation -> prompt phrase.
RELATIONS: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CANVAS = 32  # the geometry below is in pixels of a 32x32 canvas and scales with `size`
MIN_SIZE, MAX_SIZE, GAP = 8.0, 11.0, 2.0

# Held-out prompts per tag, and a cap on the train prompts of the large tags.
TEST_SIZES: dict[str, int] = {
    "single_object": 1, "two_object": 2, "counting": 16, "colors": 6, "position": 90, "color_attr": 45,
}
TRAIN_CAPS: dict[str, int] = {"position": 300}


def _noun(entry: Mapping) -> str:
    """'a red circle' / 'three circles' for one include entry."""
    count = int(entry["count"])
    words = [entry["color"]] if entry.get("color") else []
    if count == 1:
        article = "an" if (words or [entry["class"]])[0][0] in "aeiou" else "a"
        return " ".join([article, *words, entry["class"]])
    return " ".join([NUMBERS[count], *words, PLURALS[entry["class"]]])


def make_prompt(record: Mapping) -> str:
    """The prompt text of a record: 'a photo of ' + its objects, joined by 'and' or a relation."""
    include = validate_record(record)["include"]
    if len(include) == 1:
        return f"a photo of {_noun(include[0])}"
    first, second = include
    if "position" in second:
        return f"a photo of {_noun(second)} {RELATIONS[second['position'][0]]} {_noun(first)}"
    return f"a photo of {_noun(first)} and {_noun(second)}"


def _record(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = make_prompt(record)
    return record


def all_records() -> dict[str, list[dict]]:
    """Every distinct record this world can express, by tag (deterministic order)."""
    objs = [(s, c) for s in SHAPES for c in COLORS]
    out: dict[str, list[dict]] = {tag: [] for tag in TAGS}
    out["single_object"] = [_record("single_object", [{"class": s, "count": 1}]) for s in SHAPES]
    out["colors"] = [_record("colors", [{"class": s, "count": 1, "color": c}]) for s, c in objs]
    out["two_object"] = [
        _record("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}])
        for a in SHAPES for b in SHAPES if a != b
    ]
    for n in (2, 3, 4):
        for s in SHAPES:
            for c in (None, *COLORS):
                entry = {"class": s, "count": n, **({"color": c} if c else {})}
                excess = {"class": s, "count": n + 1, **({"color": c} if c else {})}
                out["counting"].append(_record("counting", [entry], [excess]))
    out["color_attr"] = [
        _record("color_attr", [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}])
        for a, ca in objs for b, cb in objs if a != b and ca != cb
    ]
    out["position"] = [
        _record("position", [
            {"class": a, "count": 1, "color": ca},
            {"class": b, "count": 1, "color": cb, "position": [rel, 0]},
        ])
        for a, ca in objs for b, cb in objs if (a, ca) != (b, cb) for rel in RELATIONS
    ]
    return out


def split_records(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) records: per tag, TEST_SIZES[tag] held out at random, the rest (capped) train."""
    rnd = random.Random(seed)
    train, test = [], []
    for tag, records in all_records().items():
        records = list(records)
        rnd.shuffle(records)
        k = TEST_SIZES[tag]
        test += records[:k]
        train += records[k:][: TRAIN_CAPS.get(tag)]
    return train, test


def sample_record(tag: str, rng: np.random.Generator, exclude_prompts: Iterable[str] = ()) -> dict:
    """A random record of ``tag`` whose prompt is not in ``exclude_prompts``."""
    if tag not in TAGS:
        raise ValueError(f"unknown tag {tag!r}; known: {', '.join(TAGS)}")
    banned = set(exclude_prompts)
    choices = [r for r in all_records()[tag] if r["prompt"] not in banned]
    if not choices:
        raise ValueError(f"every {tag} record is excluded")
    return choices[int(rng.integers(len(choices)))]


def _overlaps(box: tuple[float, float, float], placed: Sequence[tuple[float, float, float]]) -> bool:
    """Whether a square box (cx, cy, size) comes within GAP of any placed box."""
    x, y, s = box
    return any(abs(x - px) < (s + ps) / 2 + GAP and abs(y - py) < (s + ps) / 2 + GAP for px, py, ps in placed)


def _relation_holds(relation: str, obj: tuple[float, float, float], target: tuple[float, float, float]) -> bool:
    """Clear layout of ``obj`` ``relation`` ``target``: offset mostly along the relation's axis."""
    dx, dy = obj[0] - target[0], obj[1] - target[1]  # image y grows downwards
    along, across = {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along > 0 and abs(across) <= 0.5 * along


def layout(record: Mapping, rnd: random.Random, max_tries: int = 1000) -> list[tuple[str, str, float, float, float]]:
    """Objects (shape, colour, cx, cy, size) on the 32-px canvas that satisfy ``record``.

    Unspecified colours are drawn at random; boxes keep a GAP-pixel margin from each other.
    """
    include = validate_record(record)["include"]
    if sum(e["count"] for e in include) > 4:
        raise ValueError(f"a scene holds at most 4 objects: {record.get('prompt', record)!r}")
    wanted = [
        (i, e["class"], e.get("color") or rnd.choice(list(COLORS))) for i, e in enumerate(include)
        for _ in range(e["count"])
    ]
    for _ in range(max_tries):
        placed: list[tuple[float, float, float]] = []
        for _i, _shape, _color in wanted:
            size = rnd.uniform(MIN_SIZE, MAX_SIZE)
            for _ in range(50):
                box = (rnd.uniform(size / 2 + 0.5, CANVAS - size / 2 - 0.5),
                       rnd.uniform(size / 2 + 0.5, CANVAS - size / 2 - 0.5), size)
                if not _overlaps(box, placed):
                    placed.append(box)
                    break
            else:
                break
        if len(placed) < len(wanted):
            continue
        first = {}
        for (i, _, _), box in zip(wanted, placed):
            first.setdefault(i, box)
        if all(_relation_holds(e["position"][0], first[i], first[e["position"][1]])
               for i, e in enumerate(include) if "position" in e):
            return [(shape, color, *box) for (_, shape, color), box in zip(wanted, placed)]
    raise ValueError(f"could not lay out {record.get('prompt', record)!r}")


def _masks(kind: np.ndarray, cx: np.ndarray, cy: np.ndarray, s: np.ndarray, size: int) -> np.ndarray:
    """Boolean masks (M, size, size) of M shapes (kind = index into SHAPES), in pixel units."""
    kind, cx, cy, half = (a[:, None, None] for a in (kind, cx, cy, s / 2))
    coords = np.arange(size, dtype=np.float32) + np.float32(0.5)
    x, y = coords[None, None, :], coords[None, :, None]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    square = (np.abs(x - cx) <= 0.9 * half) & (np.abs(y - cy) <= 0.9 * half)
    top = cy - half
    triangle = (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    return np.where(kind == 0, circle, np.where(kind == 1, square, triangle))


def draw(objects: Sequence[Sequence[tuple[str, str, float, float, float]]], size: int = CANVAS) -> np.ndarray:
    """Render layouts (lists of (shape, colour, cx, cy, size) on the 32-px canvas) to uint8
    images (N, size, size, 3), vectorised over all objects of all images.

    Where objects overlap (never, for `layout`'s), the later one is painted on top.
    """
    images = np.empty((len(objects), size, size, 3), dtype=np.uint8)
    images[:] = BACKGROUND
    flat = [obj for objs in objects for obj in objs]
    if not flat:
        return images
    owner = np.repeat(np.arange(len(objects)), [len(objs) for objs in objects])
    kind = np.array([SHAPES.index(o[0]) for o in flat])
    rgb = np.array([COLORS[o[1]] for o in flat], dtype=np.uint8)
    geometry = np.array([o[2:5] for o in flat], dtype=np.float32) * np.float32(size / CANVAS)
    obj, y, x = np.nonzero(_masks(kind, *geometry.T, size))
    images[owner[obj], y, x] = rgb[obj]
    return images


def render_batch(
    records: Sequence[Mapping], rng: np.random.Generator, size: int = CANVAS, chunk: int = 4096
) -> np.ndarray:
    """Random scenes satisfying ``records``: uint8 (N, size, size, 3), drawn ``chunk`` at a time."""
    rnd = random.Random(int(rng.integers(2**63)))
    layouts = [layout(r, rnd) for r in records]
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    for i in range(0, len(records), chunk):
        out[i : i + chunk] = draw(layouts[i : i + chunk], size)
    return out


def render(record: Mapping, rng: np.random.Generator, size: int = CANVAS) -> np.ndarray:
    """One random scene satisfying ``record``: uint8 (size, size, 3)."""
    return render_batch([record], rng, size)[0]


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a jsonl prompt file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(records: Iterable[Mapping], path: str | Path) -> None:
    """Write records one JSON object per line."""
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/shapes"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, test = split_records(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(test, args.out / "test.jsonl")
    print(f"wrote {len(train)} train and {len(test)} test prompts to {args.out}")


if __name__ == "__main__":
    main()
