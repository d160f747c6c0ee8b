"""A GenEval-style reward for the synthetic shapes world, computed from pixels.

Detection (vectorised over the batch except for the connected-component pass):

1. Colour: a pixel is "coloured" when its chroma (max - min channel) is at least
   ``chroma_threshold``; its colour is the palette colour of nearest hue. The palette's hues are
   60 degrees apart and the background is grey, and blending a colour with grey keeps its hue,
   so blurred edges do not turn into other colours.
2. Objects: 8-connected components of each colour (one `scipy.ndimage.label` call for the whole
   batch), smaller than ``min_area`` of the image dropped.
3. Shape, from the fill ratio of the bounding box (square ~1, circle ~pi/4, upright triangle ~1/2),
   how far the mass sits below the box centre (a triangle's centroid is low) and how much of the
   box's corners is filled (square ~1, triangle ~1/2, circle ~0).

The detections become GenEval's ``objects`` mapping (`to_objects`: boxes x0, y0, x1, y1 in
pixels, colour names, largest area first as the stand-in for a detector's confidence), and
GenEval's own rules (`tpgrpo.rewards.geneval.judge`, the same code a detector-based GenEval
reward uses) give ``"shapes/geneval_correct"`` (GenEval's correctness) and
``"shapes/geneval_strict"`` (exact counts) for each image. GenEval's clauses are by class, so
the shapes world's position records of two objects of one shape (e.g. "a blue circle to the
left of a red circle") never pass them: each count-1 circle clause finds two circles.

On top of them, checks of a GenEval record (`tpgrpo.tiny.scenes`), each in [0, 1], for include
entry i (class c, count n, optional colour k, optional position) and each exclude entry:

- count: min(#c, n) / n; for an exclude entry (class, count m, optional colour), 1 when fewer
  than m such objects are found, else (m - 1) / found.
- color (entries with a colour): min(#k, n) / n, objects of colour k whatever their shape.
- binding (entries with a colour): min(#(c and k), n) / n.
- position: the fraction of (object, target object) pairs in the relation, by GenEval's
  relation rule (`tpgrpo.rewards.geneval.relations` on the detections' boxes), taking the n
  largest objects of class c *and* colour k and the target entry's likewise.
- extra (every record): min(1, objects asked for / objects found). GenEval tolerates extra
  objects; here it would let clutter (e.g. a random model's colour noise) pass any prompt.

``"shapes"`` is the mean of a record's checks (a dense score), or with ``extra_as_factor`` the
mean of the other checks times the extra check: clutter then costs in proportion to the share of
objects that were not asked for, instead of being outweighed by the checks it helps pass (a policy
trained on the plain mean learns to draw more objects). ``"shapes/strict"`` is 1 when all
of them pass; unlike ``"shapes/geneval_correct"``, nothing extra may be drawn and entries
match objects by class and colour together.
``"shapes/<check>"`` is the mean of that kind of check, NaN for records without one (use nanmean
to aggregate).

Where ``"shapes"`` differs from judge's dense ``score`` (kept as it is: trained rewards and
measured results depend on it): it adds a colour check that ignores shape and a binding check
that counts the objects of the right class *and* colour (judge's colour term counts the colour
among all objects of the class, and only when their count is exact); its count check gives full
credit for too many objects (judge: 1 - |n - found| / n) and leaves surplus to the extra
check (or factor), which judge lacks; its position check is the fraction of pairs in the
relation among the objects of the right colour, where judge scores 1 only when the clause holds
strictly; and exclude entries get partial credit in it, where judge's score leaves them out.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from tpgrpo.rewards.base import Reward, register_reward
from tpgrpo.rewards.geneval import POSITION_THRESHOLD, RELATIONS, judge, relations

# The shapes world's vocabulary; its scenes and prompts (`tpgrpo.tiny.scenes`) import it from here.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Hues 0, 60, ..., 300 degrees: blending with the grey background keeps a pixel's hue.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "yellow": (220, 220, 40),
    "green": (40, 200, 40),
    "cyan": (40, 200, 200),
    "blue": (40, 40, 220),
    "purple": (200, 40, 200),
}


def validate_record(record: Mapping) -> Mapping:
    """Check that a record only uses this world's classes, colours, counts and relations.

    Returns the record; raises ValueError naming the first problem.
    """
    include = record.get("include")
    if not include:
        raise ValueError(f"record has no 'include' entries: {record!r}")
    for i, entry in enumerate([*include, *record.get("exclude", [])]):
        if entry.get("class") not in SHAPES:
            raise ValueError(f"unknown class {entry.get('class')!r}; known: {', '.join(SHAPES)}")
        if "color" in entry and entry["color"] not in COLORS:
            raise ValueError(f"unknown color {entry['color']!r}; known: {', '.join(COLORS)}")
        if not isinstance(entry.get("count"), int) or entry["count"] < 1:
            raise ValueError(f"count must be a positive integer, got {entry.get('count')!r}")
    for i, entry in enumerate(include):
        if "position" in entry:
            relation, target = entry["position"]
            if relation not in RELATIONS:
                raise ValueError(f"unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
            if not (isinstance(target, int) and 0 <= target < len(include) and target != i):
                raise ValueError(f"position target {target!r} is not another include entry")
    return record


CHECKS: tuple[str, ...] = ("count", "color", "binding", "position", "extra")
RELATION_THRESHOLD = POSITION_THRESHOLD  # GenEval's


@dataclass(frozen=True)
class Detection:
    """One detected object: its class, colour, bounding-box centre (y, x) and size (h, w), pixels."""

    shape: str
    color: str
    cy: float
    cx: float
    h: float
    w: float
    area: int


def hue(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hue in degrees [0, 360), chroma) of RGB values, channel dim 1: (B, 3, ...) -> 2 x (B, ...)."""
    r, g, b = rgb.unbind(1)
    high, low = rgb.max(1).values, rgb.min(1).values
    chroma = high - low
    safe = chroma.clamp_min(1e-6)
    sector = torch.where(
        high == r, ((g - b) / safe) % 6, torch.where(high == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return sector * 60.0, chroma


def _hue_table() -> torch.Tensor:
    """Palette index (COLORS order) of the nearest palette hue for each whole degree: (360,)."""
    rgb = torch.tensor(list(COLORS.values()), dtype=torch.float32).T[None] / 255.0  # (1, 3, K)
    palette = hue(rgb)[0][0]
    gap = (torch.arange(360.0)[:, None] - palette[None]).abs()
    return torch.minimum(gap, 360.0 - gap).argmin(1)


def color_map(images: torch.Tensor, chroma_threshold: float) -> torch.Tensor:
    """Palette index of each pixel, -1 for background: (B, 3, H, W) in [0, 1] -> long (B, H, W)."""
    h, chroma = hue(images.float())
    nearest = _hue_table().to(h.device)[h.long().clamp(0, 359)]
    return torch.where(chroma >= chroma_threshold, nearest, -1)


def _corner_region(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Whether box coordinates (u, v) in [0, 1] lie near a corner (L1 distance < 0.3)."""
    return np.minimum(u, 1 - u) + np.minimum(v, 1 - v) < 0.3


def components(images: torch.Tensor, chroma_threshold: float = 0.3) -> dict[str, np.ndarray]:
    """Connected same-colour components of a batch and their features, each an (N,) array.

    Keys: ``image`` and ``color`` (indices), box ``y0, x0, h, w`` and ``area`` in pixels,
    ``fill`` (area / box area), ``drop`` (centroid below the box centre, in box heights) and
    ``corners`` (filled fraction of the box's four corner regions).
    """
    b, _, height, width = images.shape
    colors = color_map(images, chroma_threshold).cpu().numpy()
    k = len(COLORS)
    planes = colors[:, None] == np.arange(k)[None, :, None, None]  # (B, K, H, W)
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within a plane, never across planes
    labels, n = ndimage.label(planes.reshape(b * k, height, width), structure=structure)
    if n == 0:
        return {key: np.zeros(0) for key in ("image", "color", "y0", "x0", "h", "w", "area", "fill", "drop", "corners")}
    boxes = np.array([[s.start for s in box] + [s.stop for s in box] for box in ndimage.find_objects(labels)])
    plane, y0, x0 = boxes[:, :3].T
    h, w = boxes[:, 4] - y0, boxes[:, 5] - x0
    where = np.flatnonzero(labels)
    lab = labels.ravel()[where] - 1
    _, y, x = np.unravel_index(where, labels.shape)
    area = np.bincount(lab, minlength=n)
    u, v = (y + 0.5 - y0[lab]) / h[lab], (x + 0.5 - x0[lab]) / w[lab]
    grid = [(np.arange(size) + 0.5) / size for size in range(max(h.max(), w.max()) + 1)]
    box_corners = np.array([_corner_region(grid[hh][:, None], grid[ww][None, :]).sum() for hh, ww in zip(h, w)])
    return {
        "image": plane // k, "color": plane % k, "y0": y0, "x0": x0, "h": h, "w": w, "area": area,
        "fill": area / (h * w),
        "drop": np.bincount(lab, weights=u, minlength=n) / area - 0.5,
        "corners": np.bincount(lab, weights=_corner_region(u, v), minlength=n) / np.maximum(box_corners, 1),
    }


def classify_shapes(
    features: Mapping[str, np.ndarray], triangle_fill: float, triangle_drop: float, square_corners: float
) -> np.ndarray:
    """Shape index (into SHAPES) of each component, from `components` features -> (N,) ints.

    A triangle fills about half its box and its mass sits low (drop ~1/6); a square fills its
    box's corners (~1, less once blurred), a circle leaves them empty (~0).
    """
    triangle = (features["fill"] < triangle_fill) | (features["drop"] > triangle_drop)
    square = features["corners"] >= square_corners
    return np.where(triangle, SHAPES.index("triangle"), np.where(square, SHAPES.index("square"), SHAPES.index("circle")))


def detect(
    images: torch.Tensor,
    chroma_threshold: float = 0.3,
    min_area: float = 0.01,
    triangle_fill: float = 0.62,
    triangle_drop: float = 0.06,
    square_corners: float = 0.6,
) -> list[list[Detection]]:
    """Objects in each image: (B, 3, H, W) float in [0, 1] -> B lists of `Detection`.

    ``min_area`` is a fraction of H * W; see `classify_shapes` for the shape thresholds.
    """
    b, _, height, width = images.shape
    f = components(images, chroma_threshold)
    shape = classify_shapes(f, triangle_fill, triangle_drop, square_corners)
    color_names = list(COLORS)
    out: list[list[Detection]] = [[] for _ in range(b)]
    for i in np.flatnonzero(f["area"] >= min_area * height * width):
        out[f["image"][i]].append(
            Detection(
                SHAPES[shape[i]], color_names[f["color"][i]], f["y0"][i] + (f["h"][i] - 1) / 2,
                f["x0"][i] + (f["w"][i] - 1) / 2, float(f["h"][i]), float(f["w"][i]), int(f["area"][i]),
            )
        )
    return out


def box(obj: Detection) -> list[float]:
    """A detection's bounding box [x0, y0, x1, y1] in pixels, pixel i covering [i - 0.5, i + 0.5):
    its centre and size are exactly the detection's (cx, cy) and (w, h)."""
    return [obj.cx - obj.w / 2, obj.cy - obj.h / 2, obj.cx + obj.w / 2, obj.cy + obj.h / 2]


def to_objects(detections: Sequence[Detection]) -> dict[str, list[dict]]:
    """One image's detections as GenEval's ``objects``: {shape: [{"box", "color"}, ...]}, each
    class's largest first (ties in detection order), classes without detections absent."""
    out: dict[str, list[dict]] = {}
    for obj in sorted(detections, key=lambda o: -o.area):
        out.setdefault(obj.shape, []).append({"box": box(obj), "color": obj.color})
    return out


def _matches(objects: Sequence[Detection], entry: Mapping, color: bool = True) -> list[Detection]:
    """Objects of the entry's class (and colour, if it has one and ``color``), largest first."""
    found = [o for o in objects if o.shape == entry["class"] and (not color or o.color == entry.get("color", o.color))]
    return sorted(found, key=lambda o: -o.area)


def check_record(objects: Sequence[Detection], record: Mapping) -> dict[str, list[float]]:
    """The record's checks on one image's detections: {check name: list of values in [0, 1]}."""
    include = validate_record(record)["include"]
    checks: dict[str, list[float]] = {name: [] for name in CHECKS}
    for entry in include:
        n = entry["count"]
        checks["count"].append(min(len(_matches(objects, entry, color=False)), n) / n)
        if "color" in entry:
            checks["color"].append(min(sum(o.color == entry["color"] for o in objects), n) / n)
            checks["binding"].append(min(len(_matches(objects, entry)), n) / n)
        if "position" in entry:
            relation, target = entry["position"]
            mine = _matches(objects, entry)[:n]
            theirs = _matches(objects, include[target])[: include[target]["count"]]
            pairs = [relation in relations(box(a), box(t), RELATION_THRESHOLD) for a in mine for t in theirs]
            checks["position"].append(float(np.mean(pairs)) if pairs else 0.0)
    for entry in record.get("exclude", []):
        found = len(_matches(objects, entry))
        limit = entry["count"]
        checks["count"].append(1.0 if found < limit else (limit - 1) / found)
    wanted = sum(entry["count"] for entry in include)
    checks["extra"].append(min(1.0, wanted / len(objects)) if objects else 1.0)
    return checks


@register_reward("shapes")
class ShapesReward(Reward):
    """GenEval-style checks of the shapes world from pixels (see the module docstring)."""

    def __init__(
        self,
        chroma_threshold: float = 0.3,
        min_area: float = 0.01,
        triangle_fill: float = 0.62,
        triangle_drop: float = 0.06,
        square_corners: float = 0.6,
        extra_as_factor: bool = False,
    ):
        super().__init__()
        if not 0 < chroma_threshold < 1 or not 0 <= min_area < 1:
            raise ValueError("need 0 < chroma_threshold < 1 and 0 <= min_area < 1")
        self.options = dict(
            chroma_threshold=chroma_threshold, min_area=min_area, triangle_fill=triangle_fill,
            triangle_drop=triangle_drop, square_corners=square_corners,
        )
        self.extra_as_factor = extra_as_factor

    def dense(self, checks: Mapping[str, list[float]]) -> float:
        """The ``"shapes"`` score of one image's checks (see the module docstring)."""
        if not self.extra_as_factor:
            return float(np.mean([v for values in checks.values() for v in values]))
        asked = [v for name, values in checks.items() if name != "extra" for v in values]
        return float(np.mean(asked)) * float(np.prod(checks["extra"]))

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"shapes": dense (B,), "shapes/strict": (B,), "shapes/<check>": (B,),
        "shapes/geneval_correct": (B,), "shapes/geneval_strict": (B,)} for images (B, 3, H, W)."""
        detections = detect(images.detach(), **self.options)
        rows = [check_record(objects, record) for objects, record in zip(detections, metadata)]
        values = [[v for vs in row.values() for v in vs] for row in rows]
        verdicts = [judge(record, to_objects(objects)) for objects, record in zip(detections, metadata)]
        out = {
            "shapes": [self.dense(row) for row in rows],
            "shapes/strict": [float(all(x == 1.0 for x in v)) for v in values],
            **{f"shapes/{c}": [float(np.mean(row[c])) if row[c] else math.nan for row in rows] for c in CHECKS},
            "shapes/geneval_correct": [float(v.correct) for v in verdicts],
            "shapes/geneval_strict": [float(v.strict) for v in verdicts],
        }
        return {key: torch.tensor(v, dtype=torch.float32, device=images.device) for key, v in out.items()}
