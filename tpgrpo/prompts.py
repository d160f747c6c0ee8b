"""Prompt sets of the paper's tasks, generated from our own templates, deterministic by seed.

    python -m tpgrpo.prompts geneval --out data/geneval [--train-per-tag 500] [--test-per-tag 40] [--seed 0]
    python -m tpgrpo.prompts ocr --out data/ocr [--train 2000] [--test 200] [--seed 0]

``geneval`` writes ``train.jsonl`` and ``test.jsonl``: GenEval metadata records (``tag``,
``include``, optional ``exclude``, ``prompt``) over GenEval's 80 COCO objects and its six tags,
phrased as GenEval's prompts are ("a photo of three cups", "a photo of a dog left of a cat").
Counting asks for 2-4 objects and excludes one more, and no prompt gives a person a colour
(``colors``, ``color_attr``), as in GenEval; plurals are proper English ("people", "knives"),
where GenEval's script appends "s". The object names are ``GENEVAL_OBJECTS`` of
`tpgrpo.rewards.geneval_detector`, shared with the detector reward. ``ocr`` writes
``train.txt`` and ``test.txt``: one prompt per line, each quoting a word or short phrase to render.
Test prompts never occur in the training file (for OCR, neither does the quoted text).
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from tpgrpo.rewards.geneval import TAGS
from tpgrpo.rewards.geneval_detector import COLORS, GENEVAL_OBJECTS

RELATIONS = ("left of", "right of", "above", "below")
UNCOLORED = ("person",)  # GenEval writes no "a photo of a red person"
NUMBERS = {2: "two", 3: "three", 4: "four"}
IRREGULAR_PLURALS = {
    "person": "people", "mouse": "mice", "computer mouse": "computer mice", "knife": "knives", "sheep": "sheep",
    "skis": "skis", "scissors": "scissors", "skateboard": "skateboards",
}


def plural(name: str) -> str:
    """English plural of a GenEval object name ("bus" -> "buses", "wine glass" -> "wine glasses")."""
    if name in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[name]
    if name.endswith(("s", "sh", "ch", "x")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _record(tag: str, include: list[dict], prompt: str, exclude: list[dict] | None = None) -> dict:
    record = {"tag": tag, "include": include}
    if exclude:
        record["exclude"] = exclude
    record["prompt"] = prompt
    return record


def geneval_candidates(tag: str, objects: Sequence[str] = GENEVAL_OBJECTS, colors: Sequence[str] = COLORS) -> Iterator[dict]:
    """Every record of ``tag`` our templates can make (pairs of different objects where two are named;
    objects in `UNCOLORED` never get a colour)."""
    pairs = ((a, b) for a, b in itertools.permutations(objects, 2))
    colorable = [name for name in objects if name not in UNCOLORED]
    if tag == "single_object":
        for name in objects:
            yield _record(tag, [{"class": name, "count": 1}], f"a photo of {with_article(name)}")
    elif tag == "two_object":
        for a, b in itertools.combinations(objects, 2):
            yield _record(tag, [{"class": a, "count": 1}, {"class": b, "count": 1}],
                          f"a photo of {with_article(a)} and {with_article(b)}")
    elif tag == "counting":
        for name, count in itertools.product(objects, NUMBERS):
            yield _record(tag, [{"class": name, "count": count}], f"a photo of {NUMBERS[count]} {plural(name)}",
                          exclude=[{"class": name, "count": count + 1}])
    elif tag == "colors":
        for name, color in itertools.product(colorable, colors):
            yield _record(tag, [{"class": name, "count": 1, "color": color}], f"a photo of {with_article(f'{color} {name}')}")
    elif tag == "position":
        for (a, b), relation in itertools.product(pairs, RELATIONS):
            yield _record(tag, [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                          f"a photo of {with_article(a)} {relation} {with_article(b)}")
    elif tag == "color_attr":
        colorable_pairs = itertools.permutations(colorable, 2)
        for (a, b), (ca, cb) in itertools.product(colorable_pairs, itertools.permutations(colors, 2)):
            yield _record(tag, [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                          f"a photo of {with_article(f'{ca} {a}')} and {with_article(f'{cb} {b}')}")
    else:
        raise ValueError(f"unknown GenEval tag {tag!r}; tags: {', '.join(TAGS)}")


def _sample(candidates: Iterator[dict], count: int, rng: random.Random) -> list[dict]:
    """``count`` distinct records drawn uniformly (reservoir sampling: large tags are never listed whole)."""
    chosen: list[dict] = []
    for seen, record in enumerate(candidates):
        if len(chosen) < count:
            chosen.append(record)
        else:
            slot = rng.randrange(seen + 1)
            if slot < count:
                chosen[slot] = record
    rng.shuffle(chosen)
    return chosen


def geneval_prompts(train_per_tag: int, test_per_tag: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) GenEval records, ``*_per_tag`` of each tag (fewer where a tag has fewer prompts)."""
    if train_per_tag < 1 or test_per_tag < 1:
        raise ValueError("need at least one train and one test prompt per tag")
    train, test = [], []
    for index, tag in enumerate(TAGS):
        records = _sample(geneval_candidates(tag), train_per_tag + test_per_tag, random.Random(seed * 1000 + index))
        test += records[:test_per_tag]
        train += records[test_per_tag:]
    return train, test


OCR_WORDS = (
    "OPEN", "CLOSED", "SALE", "EXIT", "HELLO", "WELCOME", "COFFEE", "BAKERY", "PIZZA", "BOOKS", "MUSIC", "GARDEN",
    "STOP", "DANGER", "QUIET", "PARKING", "TICKETS", "HOTEL", "PHARMACY", "MARKET", "FRESH", "LOVE", "DREAM", "OCEAN",
    "FOREST", "SUNRISE", "THUNDER", "ROCKET", "PLANET", "GALAXY", "WINTER", "SUMMER", "AUTUMN", "SPRING", "CANDY",
    "TEA", "JAZZ", "CINEMA", "LIBRARY", "STATION", "HARBOR", "BRIDGE", "CASTLE", "DRAGON", "TIGER", "EAGLE", "WOLF",
    "RIVER", "MOUNTAIN", "DESERT", "ISLAND", "VILLAGE", "CITY", "SCHOOL", "MUSEUM", "THEATER", "STUDIO", "KITCHEN",
)
OCR_ADJECTIVES = ("BIG", "LITTLE", "GOLDEN", "SILENT", "HAPPY", "WILD", "LUCKY", "MIDNIGHT", "NORTHERN", "SECRET")
OCR_TEMPLATES = (
    'A storefront sign that says "{text}"',
    'A neon sign reading "{text}" on a brick wall',
    'A coffee mug printed with the words "{text}"',
    'A book cover with the title "{text}"',
    'A chalkboard menu that says "{text}"',
    'A street sign that reads "{text}"',
    'A T-shirt with "{text}" written across the front',
    'A poster with the headline "{text}"',
    'A birthday cake with "{text}" written in icing',
    'A wooden signpost carved with "{text}"',
)


def ocr_texts() -> list[str]:
    """Every word and two-word phrase the OCR prompts may quote."""
    phrases = [f"{a} {w}" for a, w in itertools.product(OCR_ADJECTIVES, OCR_WORDS)]
    return list(OCR_WORDS) + phrases + [f"{w} {n}" for w, n in itertools.product(OCR_WORDS[:20], ("24", "2026", "NOW"))]


def ocr_prompts(train: int, test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, test) OCR prompts; no quoted text of a test prompt appears in a training prompt."""
    if train < 1 or test < 1:
        raise ValueError("need at least one train and one test prompt")
    rng = random.Random(seed)
    texts = ocr_texts()
    rng.shuffle(texts)
    test_texts = max(1, len(texts) // 10)
    held_out, seen = texts[:test_texts], texts[test_texts:]

    def draw(pool: list[str], count: int) -> list[str]:
        prompts = [template.format(text=text) for text, template in itertools.product(pool, OCR_TEMPLATES)]
        rng.shuffle(prompts)
        return prompts[:count]

    return draw(seen, train), draw(held_out, test)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tpgrpo.prompts", description=__doc__.split("\n\n")[0])
    tasks = parser.add_subparsers(dest="task", required=True)
    geneval = tasks.add_parser("geneval", help="GenEval metadata (train.jsonl, test.jsonl)")
    geneval.add_argument("--train-per-tag", type=int, default=500)
    geneval.add_argument("--test-per-tag", type=int, default=40)
    ocr = tasks.add_parser("ocr", help="OCR prompts with quoted text (train.txt, test.txt)")
    ocr.add_argument("--train", type=int, default=2000)
    ocr.add_argument("--test", type=int, default=200)
    for sub in (geneval, ocr):
        sub.add_argument("--out", required=True, help="output folder")
        sub.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.task == "geneval":
        splits = geneval_prompts(args.train_per_tag, args.test_per_tag, args.seed)
        for name, records in zip(("train", "test"), splits):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        splits = ocr_prompts(args.train, args.test, args.seed)
        for name, prompts in zip(("train", "test"), splits):
            (out / f"{name}.txt").write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    print(f"wrote {len(splits[0])} training and {len(splits[1])} test prompts ({args.task}) to {out}")


if __name__ == "__main__":
    main()
