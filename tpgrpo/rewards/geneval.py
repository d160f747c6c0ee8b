"""GenEval's rules as a pure function: is an image's set of detections right for a metadata record?

`judge(record, objects)` takes a GenEval metadata record and the detections of one image and
returns a `Judgement`: GenEval's correctness (``correct``), a stricter exact-count variant
(``strict``), a dense partial-credit ``score`` for training, and the ``reasons`` of each failure.
It knows nothing of detectors: the pixel detector of the shapes world (`tpgrpo.rewards.shapes`)
and an object-detector reward both produce the same ``objects`` mapping and share these rules.

Record (GenEval's ``evaluation_metadata.jsonl``)::

    {"tag": "position",
     "include": [{"class": "dog", "count": 1},
                 {"class": "cat", "count": 1, "color": "red", "position": ["left of", 0]}],
     "exclude": [{"class": "dog", "count": 2}],          # optional
     "prompt": "a photo of a red cat left of a dog"}

``"position": [relation, j]`` on ``include[i]`` means "include[i] is <relation> include[j]", with
``j < i``. Clauses are by class, as in GenEval: each clause sees all detections of its class,
so two include clauses of one class (which GenEval's records never have) see each other's
objects: "a blue circle left of a red circle" can then never hold. The tag (GenEval's: single_object, two_object, counting, colors, position, color_attr)
does not enter the rules, so any tag is accepted. An exclude clause may name a ``color`` (the
shapes world's counting records do: "two red circles" excludes a third *red* circle); only
detections of that colour count towards it then. GenEval's own records never do, so this does
not change GenEval's verdicts.

Objects: ``{class name: [{"box": [x0, y0, x1, y1], "color": name or None}, ...]}``, the
detections kept after the confidence threshold, most confident first, in pixel coordinates with
y growing downwards. A class without detections may be absent; a detection whose colour is None
(or missing) matches no colour.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
POSITION_THRESHOLD = 0.1  # GenEval's default


@dataclass(frozen=True)
class Judgement:
    """The verdict on one image.

    ``correct``: GenEval's rule. ``strict``: the same with exact counts (implies ``correct``).
    ``score``: dense partial credit in [0, 1] (see `judge`). ``reasons``: one line per failed rule,
    prefixed ``"correct: "`` (breaks GenEval's rule) or ``"strict: "`` (breaks the strict rule);
    empty exactly when ``strict`` holds.
    """

    correct: bool
    strict: bool
    score: float
    reasons: list[str] = field(default_factory=list)


def relations(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """GenEval's relations of box A to box B (boxes [x0, y0, x1, y1], y down): a subset of RELATIONS.

    With centres c and sizes s = (width, height), the offset c_A - c_B has each component's
    magnitude shrunk by ``position_threshold * (s_A + s_B)`` on its axis (floored at 0, sign
    kept). When both shrunk components are below 1e-3 there is no relation; otherwise, divided by
    the length of the unshrunk offset, an x part below -0.5 is "left of", above 0.5 "right of",
    a y part below -0.5 "above", above 0.5 "below" (a diagonal offset can give two).
    """
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    size = (a[2:] - a[:2]) + (b[2:] - b[:2])
    revised = np.maximum(np.abs(offset) - position_threshold * size, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    found = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {name for name, holds in found.items() if holds}


def _check_clause(clause: object, where: str) -> None:
    if not isinstance(clause, Mapping):
        raise ValueError(f"{where} must be a mapping with 'class' and 'count', got {clause!r}")
    if not isinstance(clause.get("class"), str) or not clause["class"]:
        raise ValueError(f"{where} needs a 'class' name, got {clause.get('class')!r}")
    count = clause.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where} 'count' must be an integer >= 1, got {count!r}")
    color = clause.get("color")
    if color is not None and (not isinstance(color, str) or not color):
        raise ValueError(f"{where} 'color' must be a colour name, got {color!r}")


def validate_record(record: object) -> Mapping:
    """Check the structure of a GenEval record; returns it, or raises ValueError naming the problem."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a GenEval record must be a mapping, got {type(record).__name__}")
    if "tag" in record and not isinstance(record["tag"], str):
        raise ValueError(f"record 'tag' must be a string, got {record['tag']!r}")
    include = record.get("include")
    if not isinstance(include, Sequence) or isinstance(include, str) or not include:
        raise ValueError(f"record has no 'include' clauses: {record.get('prompt', record)!r}")
    for i, clause in enumerate(include):
        _check_clause(clause, f"include[{i}]")
        if clause.get("position") is None:
            continue
        position = clause["position"]
        if isinstance(position, str) or not isinstance(position, Sequence) or len(position) != 2:
            raise ValueError(f"include[{i}] 'position' must be [relation, index], got {position!r}")
        relation, target = position
        if relation not in RELATIONS:
            raise ValueError(f"include[{i}] has unknown relation {relation!r}; known: {', '.join(RELATIONS)}")
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < i:
            raise ValueError(f"include[{i}] position target {target!r} is not an earlier include clause (0..{i - 1})")
    exclude = record.get("exclude", [])
    if isinstance(exclude, (str, Mapping)) or not isinstance(exclude, Sequence):
        raise ValueError(f"record 'exclude' must be a list of clauses, got {exclude!r}")
    for i, clause in enumerate(exclude):
        _check_clause(clause, f"exclude[{i}]")
    return record


def _detections(objects: Mapping, name: str) -> list[Mapping]:
    """The detections of class ``name``, checked: each has a 4-number box with x0 <= x1, y0 <= y1."""
    found = objects.get(name, [])
    if isinstance(found, (str, Mapping)) or not isinstance(found, Sequence):
        raise ValueError(f"objects[{name!r}] must be a list of detections, got {type(found).__name__}")
    for k, det in enumerate(found):
        box = det.get("box") if isinstance(det, Mapping) else None
        if (
            box is None or isinstance(box, str) or len(box) != 4
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)
            or box[2] < box[0] or box[3] < box[1]
        ):
            raise ValueError(f"objects[{name!r}][{k}] needs a 'box' [x0, y0, x1, y1] with x0 <= x1, y0 <= y1")
    return list(found)


def _describe(i: int, clause: Mapping) -> str:
    color = f"{clause['color']} " if clause.get("color") else ""
    return f"include[{i}] ({clause['count']} {color}{clause['class']})"


def _clause_reasons(
    i: int, clause: Mapping, taken: list[Mapping], found: int, exact: bool,
    targets: Sequence[list[Mapping] | None], threshold: float,
) -> list[str]:
    """Why include[i] fails (empty when it holds), given the detections it took and how many exist."""
    name, count, color = clause["class"], clause["count"], clause.get("color")
    what = _describe(i, clause)
    if (found != count) if exact else (found < count):
        need = "exactly" if exact else "at least"
        return [f"{what}: {found} {name} detected, needs {need} {count}"]
    reasons = []
    if color:
        wrong = [det.get("color") for det in taken if det.get("color") != color]
        if wrong:
            listed = ", ".join(map(str, wrong))
            reasons.append(f"{what}: {len(wrong)} of the {len(taken)} {name} taken are not {color} ({listed})")
    if clause.get("position") is not None:
        relation, j = clause["position"]
        theirs = targets[j]
        if theirs is None:
            reasons.append(f"{what}: its position target include[{j}] does not hold")
        else:
            misses = sum(relation not in relations(a["box"], t["box"], threshold) for a in taken for t in theirs)
            if misses:
                pairs = f"{misses} of {len(taken) * len(theirs)} ({name}, include[{j}]) pairs"
                reasons.append(f"{what}: {pairs} are not '{relation}'")
    return reasons


def _rule(record: Mapping, objects: Mapping, exact: bool, threshold: float) -> tuple[list[str], list[bool]]:
    """(reasons the record fails on ``objects``, whether each include clause holds) under
    GenEval's rule, or the exact-count rule when ``exact``."""
    reasons: list[str] = []
    targets: list[list[Mapping] | None] = []
    for i, clause in enumerate(record["include"]):
        found = _detections(objects, clause["class"])
        taken = found if exact else found[: clause["count"]]
        failed = _clause_reasons(i, clause, taken, len(found), exact, targets, threshold)
        reasons += failed
        targets.append(None if failed else taken)
    for i, clause in enumerate(record.get("exclude", [])):
        color = clause.get("color")
        found = [d for d in _detections(objects, clause["class"]) if not color or d.get("color") == color]
        if len(found) >= clause["count"]:
            what = f"{color} {clause['class']}" if color else clause["class"]
            reasons.append(f"exclude[{i}]: {len(found)} {what} detected, must be fewer than {clause['count']}")
    return reasons, [taken is not None for taken in targets]


def _score(record: Mapping, objects: Mapping, strict_ok: Sequence[bool]) -> float:
    """Mean of the count, colour and position terms of all include clauses (see `judge`)."""
    terms: list[float] = []
    for i, clause in enumerate(record["include"]):
        count, color = clause["count"], clause.get("color")
        found = _detections(objects, clause["class"])
        terms.append(max(0.0, 1 - abs(count - len(found)) / count))
        if color:
            matching = sum(det.get("color") == color for det in found)
            terms.append(max(0.0, 1 - abs(count - matching) / count) if len(found) == count else 0.0)
        if clause.get("position") is not None:
            terms.append(1.0 if strict_ok[i] else 0.0)
    return float(np.mean(terms))


def judge(record: Mapping, objects: Mapping, position_threshold: float = POSITION_THRESHOLD) -> Judgement:
    """GenEval's verdict on one image's detections ``objects`` for ``record`` (see the module docstring).

    - ``correct`` (GenEval's rule): include clause i takes the first ``count`` detections of its
      class and holds when there are ``count`` of them, all of its colour (if it names one), and
      (if it names a position) its target clause holds and each of them is in the relation to
      every detection the target took. An exclude clause fails when at least ``count``
      detections of its class (and colour, if given) exist. Correct: all includes hold, no
      exclude fails.
    - ``strict``: the same, except that a clause takes all detections of its class and needs
      exactly ``count``; colour and position are checked on all of them, against everything
      the (strict) target clause took.
    - ``score``: the mean of all these terms pooled over the include clauses (exclude clauses do
      not enter it): per clause a count term max(0, 1 - |count - n| / count) with n its class's
      detections; with a colour, a colour term max(0, 1 - |count - m| / count), m the detections
      of that colour, when n == count, else 0; with a position, 1 when the clause holds strictly
      (count, colour, position and its target), else 0.

    ``score`` is Flow-GRPO's partial-credit GenEval reward (its reward server's ``score``) made
    well defined. There the count term is not clamped (it goes below 0 when more than twice the
    objects asked for are found); a clause with the wrong count gets one 0 for its colour and
    position together, and one with the wrong colour no position term at all; and a failed
    position check adds a 0 and then a 1, so it is scored as both failed and passed. Here every
    term is in [0, 1] and each clause always has the same number of terms (1 + colour +
    position), so a record's score has a fixed denominator. Its ``strict_correct`` also ignores
    exclude clauses, which ``strict`` checks (for GenEval's records, whose excludes ask for
    fewer than count + 1 of an include's class, exact counts make them redundant).
    """
    record = validate_record(record)
    if not isinstance(objects, Mapping):
        raise ValueError(f"objects must map class names to lists of detections, got {type(objects).__name__}")
    if not position_threshold >= 0:
        raise ValueError(f"position_threshold must be >= 0, got {position_threshold!r}")
    loose, _ = _rule(record, objects, exact=False, threshold=position_threshold)
    exact, strict_ok = _rule(record, objects, exact=True, threshold=position_threshold)
    return Judgement(
        correct=not loose,
        strict=not exact,
        score=_score(record, objects, strict_ok),
        reasons=[f"correct: {r}" for r in loose] + [f"strict: {r}" for r in exact],
    )


def geneval_overall(tag_means: Mapping[str, float]) -> float:
    """GenEval's overall score: the mean over its six tags of the fraction of correct images.

    ``tag_means`` maps a tag (or the reward's column ``"geneval/<tag>"``) to that tag's correct
    rate; other keys are ignored. As GenEval's ``summary_scores.py``, the mean is over the tags
    evaluated: a tag that is absent or NaN is left out; NaN when none is there.
    """
    rates = []
    for tag in TAGS:
        value = tag_means.get(tag, tag_means.get(f"geneval/{tag}", math.nan))
        if value is not None and math.isfinite(float(value)):
            rates.append(float(value))
    return float(np.mean(rates)) if rates else math.nan


def geneval_summary(name: str, means: Mapping[str, float]) -> dict[str, float]:
    """``{"<name>/overall": GenEval's overall score}`` from a reward's per-tag means ``<name>/<tag>``
    (`geneval_overall`); empty when no tag was evaluated."""
    overall = geneval_overall({tag: means.get(f"{name}/{tag}", math.nan) for tag in TAGS})
    return {} if math.isnan(overall) else {f"{name}/overall": overall}
