"""OCR reward of Flow-GRPO's text-rendering task: does the image show the text quoted in the prompt?

The target is the text between double quotes in the prompt (all quoted parts, in order; Flow-GRPO's
prompts have one, and a prompt without quotes is its own target, as in Flow-GRPO). The recognised
text comes from Tesseract (``pytesseract``) by default. Both are lower-cased and stripped of
whitespace, then

    score = 1 - min(d, len(target)) / len(target)    in [0, 1]

with d = 0 when the target occurs in the recognised text (extra text costs nothing), else the
Levenshtein distance between the two; an empty target scores 1.
Tesseract needs ``pip install -e .[ocr]`` and the system package ``tesseract-ocr`` (``make install-ocr``).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import Reward, RewardConfigError, register_reward

Recognizer = Callable[[Image.Image], str]
INSTALL_HINT = "install with `pip install -e .[ocr]` and `apt-get install tesseract-ocr` (or `make install-ocr`)"


def levenshtein(a: str, b: str) -> int:
    """Edit distance between ``a`` and ``b``: single-character insertions, deletions, substitutions."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def quoted_text(prompt: str) -> str:
    """The text between double quotes in ``prompt`` (parts joined by spaces), else the whole prompt."""
    parts = re.findall(r'"([^"]*)"', prompt)
    return " ".join(parts) if parts else prompt


def normalise(text: str) -> str:
    """Lower-cased ``text`` without whitespace, the form in which texts are compared."""
    return "".join(text.split()).lower()


def text_similarity(recognised: str, target: str) -> float:
    """1 - capped, normalised edit distance of ``recognised`` to ``target``, in [0, 1] (module docstring)."""
    recognised, target = normalise(recognised), normalise(target)
    if not target or target in recognised:
        return 1.0
    return 1.0 - min(levenshtein(recognised, target), len(target)) / len(target)


def tesseract_recognizer(lang: str = "eng", config: str = "") -> Recognizer:
    """A function image -> text running Tesseract; a `RewardConfigError` when it is not installed."""
    try:
        import pytesseract
    except ImportError:
        raise RewardConfigError(f"ocr: the Python package pytesseract is missing; {INSTALL_HINT}") from None
    try:
        languages = set(pytesseract.get_languages())
    except pytesseract.TesseractNotFoundError:
        raise RewardConfigError(f"ocr: the tesseract program is missing; {INSTALL_HINT}") from None
    missing = sorted(set(lang.split("+")) - languages)
    if missing:
        raise RewardConfigError(
            f"ocr: tesseract has no {missing[0]!r} language data (it has {', '.join(sorted(languages))}); "
            f"install the package tesseract-ocr-{missing[0]}"
        )

    def recognise(image: Image.Image) -> str:
        return pytesseract.image_to_string(image, lang=lang, config=config)

    return recognise


@register_reward("ocr")
class OcrReward(Reward):
    """Similarity of the recognised text to the prompt's quoted text, per image (module docstring).

    Options: ``lang`` and ``tesseract_config`` (Tesseract's language, e.g. ``"eng"``, and extra
    command-line flags, e.g. ``"--psm 11"``), ``workers`` (images recognised in parallel).
    ``recognizer`` (a function PIL image -> text) replaces Tesseract, e.g. in tests.
    """

    def __init__(
        self, lang: str = "eng", tesseract_config: str = "", workers: int = 4, recognizer: Recognizer | None = None
    ):
        super().__init__()
        if workers < 1:
            raise RewardConfigError(f"ocr: workers must be >= 1, got {workers}")
        self.workers = workers
        self.recognizer = recognizer or tesseract_recognizer(lang, tesseract_config)

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"ocr": (B,) in [0, 1], "ocr/exact": (B,) 1 where the target was found} for images (B, 3, H, W)."""
        pictures = [Image.fromarray(array) for array in to_uint8(images)]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            texts = list(pool.map(self.recognizer, pictures))
        scores = [text_similarity(text, quoted_text(prompt)) for text, prompt in zip(texts, prompts)]
        return {
            self.name: torch.tensor(scores, dtype=torch.float32, device=images.device),
            f"{self.name}/exact": torch.tensor([float(s == 1.0) for s in scores], device=images.device),
        }
