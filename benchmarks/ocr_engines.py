"""Benchmark: the OCR reward's engines on one set of rendered text images.

The set: ``--count`` pictures of ``--size`` px, drawn with seed ``--seed``. Each shows one text of
the OCR task (`tpgrpo.prompts.ocr_texts`: words and two-word phrases) in upper, title or lower
case, in a TrueType font that matplotlib ships (DejaVu Sans, Serif and Mono in their weights and
slants, STIX), at a random size (shrunk until it fits) and place, in a colour on a background
that differs from it in luminance by at least ``MIN_CONTRAST`` (light on dark or dark on light),
under one of these conditions, in turn:

* ``plain``: as drawn;
* ``rotated``: turned by 8 to 20 degrees either way;
* ``noisy``: Gaussian pixel noise (standard deviation 20 of 255) over the whole picture;
* ``blurred``: a Gaussian blur of radius 1.5 px;
* ``two_lines``: a phrase broken over two lines (words have one line).

Every engine reads every picture through `tpgrpo.rewards.ocr.OcrReward` with its default options
(the reward's ``read``), and the reward's formula scores the text read against the prompt
``'a sign that says "<text>"'``.
Per engine: the exact-match rate (the reward's ``ocr/exact``: the text found after lower-casing and
dropping whitespace), the mean reward, and seconds per image on the CPU: wall clock over the whole
set (the engine's own parallelism: ``workers`` images at a time) and CPU time (this process and
its child processes, Tesseract's), after one warm-up picture that loads the engine. Engines:
``rapidocr`` (always), ``tesseract`` and ``tesseract --psm 11`` (when pytesseract and the program
are installed), ``got_ocr2`` (when ``--got-ocr2`` names a folder or cached hub id; it needs the
model's weights, so it is reported as not measured otherwise). An engine that is not available is
listed with the reason.

    python benchmarks/ocr_engines.py                   # a minute or two on 2 CPU cores
    python benchmarks/ocr_engines.py --got-ocr2 stepfun-ai/GOT-OCR-2.0-hf

Writes ``benchmarks/results/ocr_engines.json`` and prints one summary line.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpuinfo import cpu_model  # noqa: E402
from tpgrpo.prompts import ocr_texts  # noqa: E402
from tpgrpo.rewards.base import RewardConfigError  # noqa: E402
from tpgrpo.rewards.ocr import OcrReward, quoted_text, text_similarity  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "ocr_engines.json"
FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)
CONDITIONS = ("plain", "rotated", "noisy", "blurred", "two_lines")
FONT_SIZES = (20, 28, 40, 56, 80)
MIN_CONTRAST = 90  # luminance difference of text and background, of 255
PROMPT = 'a sign that says "{text}"'


# ---------------------------------------------------------------- the rendered set


def luminance(colour: tuple[int, int, int]) -> float:
    red, green, blue = colour
    return 0.299 * red + 0.587 * green + 0.114 * blue


def contrasting_colours(rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(text colour, background colour), random, at least `MIN_CONTRAST` apart in luminance."""
    while True:
        text, background = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        if abs(luminance(text) - luminance(background)) >= MIN_CONTRAST:
            return text, background


def styled(text: str, rng: random.Random) -> str:
    return rng.choice((str.upper, str.title, str.lower))(text)


def fitting_font(font: str, size: int, text: str, width: int) -> ImageFont.FreeTypeFont:
    """``font`` at ``size`` or the largest smaller size at which ``text`` fits in 85% of ``width``."""
    while True:
        face = ImageFont.truetype(str(FONT_DIR / font), size)
        left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=face)
        if right - left <= 0.85 * width or size <= 8:
            return face
        size -= 4


def render(text: str, font: str, size: int, colours, condition: str, rng: random.Random, side: int) -> Image.Image:
    """``text`` drawn as the case says (module docstring), an RGB picture ``side`` px square."""
    foreground, background = colours
    drawn = text.replace(" ", "\n", 1) if condition == "two_lines" else text
    face = fitting_font(font, size, drawn, side)
    picture = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(picture)
    left, top, right, bottom = draw.multiline_textbbox((0, 0), drawn, font=face, align="center")
    x = rng.uniform(0.05 * side, max(0.05 * side, 0.95 * side - (right - left))) - left
    y = rng.uniform(0.1 * side, max(0.1 * side, 0.9 * side - (bottom - top))) - top
    draw.multiline_text((x, y), drawn, fill=foreground, font=face, align="center")
    if condition == "rotated":
        angle = rng.uniform(8, 20) * rng.choice((-1, 1))
        picture = picture.rotate(angle, resample=Image.BICUBIC, fillcolor=background)
    elif condition == "noisy":
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 20, (side, side, 3))
        picture = Image.fromarray(np.clip(np.asarray(picture) + noise, 0, 255).astype(np.uint8))
    elif condition == "blurred":
        picture = picture.filter(ImageFilter.GaussianBlur(1.5))
    return picture


def rendered_set(count: int, seed: int, side: int) -> list[dict]:
    """``count`` cases: their text, rendering parameters and picture (module docstring)."""
    rng = random.Random(seed)
    phrases = [text for text in ocr_texts() if " " in text]
    words = [text for text in ocr_texts() if " " not in text]
    cases = []
    for index in range(count):
        condition = CONDITIONS[index % len(CONDITIONS)]
        text = styled(rng.choice(phrases if condition == "two_lines" or rng.random() < 0.5 else words), rng)
        font, size, colours = rng.choice(FONTS), rng.choice(FONT_SIZES), contrasting_colours(rng)
        picture = render(text, font, size, colours, condition, rng, side)
        cases.append({"text": text, "font": font, "size": size, "condition": condition,
                      "light_on_dark": luminance(colours[0]) > luminance(colours[1]), "picture": picture})
    return cases


# ---------------------------------------------------------------- engines


def engines(got_ocr2: str | None) -> dict[str, dict]:
    """Name -> OcrReward options of every engine to measure."""
    measured = {"rapidocr": {"engine": "rapidocr"}, "tesseract": {"engine": "tesseract"},
                "tesseract --psm 11": {"engine": "tesseract", "tesseract_config": "--psm 11"}}
    measured["got_ocr2"] = {"engine": "got_ocr2", "model": got_ocr2} if got_ocr2 else None
    return measured


def cpu_seconds() -> float:
    """CPU time of this process and its finished child processes (Tesseract runs as one)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def measure(reward: OcrReward, cases: list[dict]) -> dict:
    """Exact-match rate, mean reward, wall and CPU seconds per image, and what was read, on ``cases``."""
    pictures = [case["picture"] for case in cases]
    reward.read(pictures[:1])  # loads a lazily loaded engine
    started, cpu_started = time.perf_counter(), cpu_seconds()
    texts = reward.read(pictures)
    wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    scores = [text_similarity(text, quoted_text(PROMPT.format(text=case["text"]))) for text, case in zip(texts, cases)]
    exact = [float(score == 1.0) for score in scores]  # the reward's ocr/exact
    by_condition = {
        condition: float(np.mean([e for e, case in zip(exact, cases) if case["condition"] == condition]))
        for condition in CONDITIONS
    }
    return {
        "exact_match_rate": float(np.mean(exact)),
        "mean_reward": float(np.mean(scores)),
        "seconds_per_image": wall / len(cases),
        "cpu_seconds_per_image": cpu / len(cases),
        "workers": reward.workers,
        "exact_match_rate_by_condition": by_condition,
        "read": texts,
    }


# ---------------------------------------------------------------- record


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def tesseract_version() -> str | None:
    try:
        import pytesseract

        return str(pytesseract.get_tesseract_version())
    except Exception:  # not installed: recorded as absent
        return None


def machine() -> dict:
    """Where the numbers come from: CPU model and cores, library versions, date."""
    return {
        "cpu": cpu_model(platform.processor() or "unknown"),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        "rapidocr_onnxruntime": package_version("rapidocr-onnxruntime"),
        "opencv": package_version("opencv-python") or package_version("opencv-python-headless"),
        "pytesseract": package_version("pytesseract"),
        "tesseract": tesseract_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def summary(results: dict) -> str:
    """One line: per engine its exact-match rate, mean reward and seconds per image, or why it is missing."""
    parts = []
    for name, result in results["engines"].items():
        if "not_measured" in result:
            parts.append(f"{name}: not measured")
        else:
            parts.append(f"{name}: exact {result['exact_match_rate']:.0%}, reward {result['mean_reward']:.3f}, "
                         f"{result['seconds_per_image']:.3f} s/image")
    return f"OCR engines on {results['images']} rendered images: " + "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=80, help="rendered images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=512, help="image side in px")
    parser.add_argument("--got-ocr2", default=None, help="GOT-OCR2 folder or cached hub id (default: not measured)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    cases = rendered_set(args.count, args.seed, args.size)
    results = {
        "machine": machine(),
        "images": len(cases),
        "set": {"seed": args.seed, "size": args.size, "conditions": list(CONDITIONS), "fonts": list(FONTS),
                "font_sizes": list(FONT_SIZES), "min_contrast": MIN_CONTRAST,
                "light_on_dark": sum(case["light_on_dark"] for case in cases),
                "texts": [case["text"] for case in cases]},
        "engines": {},
    }
    for name, options in engines(args.got_ocr2).items():
        if options is None:
            results["engines"][name] = {"not_measured": "needs the model's weights: pass --got-ocr2 FOLDER_OR_HUB_ID"}
            continue
        try:
            reward = OcrReward(**options)
        except RewardConfigError as error:
            results["engines"][name] = {"not_measured": str(error)}
            continue
        results["engines"][name] = {"options": options, **measure(reward, cases)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results))


if __name__ == "__main__":
    main()
