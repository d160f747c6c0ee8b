"""OCR reward of Flow-GRPO's text-rendering task: does the image show the text quoted in the prompt?

The target is the text between double quotes in the prompt (all quoted parts, in order; Flow-GRPO's
prompts have one, and a prompt without quotes is its own target, as in Flow-GRPO). The recognised
text comes from an OCR engine (below). Both are lower-cased and stripped of whitespace, then

    score = 1 - min(d, len(target)) / len(target)    in [0, 1]

with d = 0 when the target occurs in the recognised text (extra text costs nothing), else the
Levenshtein distance between the two; an empty target scores 1.

Engines (option ``engine``):

- ``"tesseract"`` (default; no model weights, runs on the CPU): ``pytesseract`` and the system
  package ``tesseract-ocr``: ``pip install -e .[ocr]`` and ``make install-ocr``.
- ``"got_ocr2"``: GOT-OCR 2.0 (Wei et al., 2024) through transformers' native
  ``GotOcr2ForConditionalGeneration``, hub id ``stepfun-ai/GOT-OCR-2.0-hf`` (or a folder saved with
  ``save_pretrained``), in its plain-text mode ("OCR: "), batched, greedy, without gradients,
  loaded once. Chosen over Florence-2 (also native in transformers 5) because it is a model for
  OCR alone, trained on scene text as well as documents, and its plain mode returns just the
  text, with no task tokens or regions to strip; its ``-hf`` checkpoint is published for the
  native class by the model's authors, while Florence-2's own checkpoints need
  ``trust_remote_code`` and the native class needs community conversions. Flow-GRPO itself
  scores with PaddleOCR, which is not a transformers model.

Config (``model.rewards``)::

    ocr: {weight: 1.0, engine: got_ocr2, model: stepfun-ai/GOT-OCR-2.0-hf, dtype: bfloat16,
          batch_size: 16, max_new_tokens: 64}
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
from PIL import Image

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import RewardConfigError, register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, freeze, load_pretrained

Recognizer = Callable[[Image.Image], str]
INSTALL_HINT = "install with `pip install -e .[ocr]` and `apt-get install tesseract-ocr` (or `make install-ocr`)"
ENGINES: tuple[str, ...] = ("tesseract", "got_ocr2")
DEFAULT_GOT_OCR2 = "stepfun-ai/GOT-OCR-2.0-hf"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def got_ocr2_image_tokens(vision_config) -> int:
    """Image tokens per picture of a GOT-OCR2 model: its patch grid after the projector's two stride-2 convolutions."""
    side = vision_config.image_size // vision_config.patch_size
    for _ in range(2):
        side = (side + 1) // 2  # kernel 3, stride 2, padding 1
    return side * side


class GotOcr2Recognizer(torch.nn.Module):
    """GOT-OCR2 in plain-text mode: PIL pictures -> the text read from each, ``batch_size`` at a time.

    The model is frozen and generates greedily up to ``max_new_tokens`` tokens (stopping at its
    end-of-turn token); the text is the decoded continuation without special tokens.
    """

    def __init__(self, model: str | os.PathLike = DEFAULT_GOT_OCR2, max_new_tokens: int = 64,
                 batch_size: int = 16, dtype: str = "float32"):
        super().__init__()
        from transformers import GotOcr2ForConditionalGeneration, GotOcr2Processor

        self.processor = load_pretrained(GotOcr2Processor.from_pretrained, model, "GOT-OCR2 processor")
        loader = partial(GotOcr2ForConditionalGeneration.from_pretrained, dtype=DTYPES[dtype])
        self.model = freeze(load_pretrained(loader, model, "GOT-OCR2 model"))
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_image_tokens = got_ocr2_image_tokens(self.model.config.vision_config)

    @torch.no_grad()
    def forward(self, pictures: Sequence[Image.Image]) -> list[str]:
        """The text GOT-OCR2 reads in each picture (same order)."""
        parameter = next(self.model.parameters())
        texts: list[str] = []
        for start in range(0, len(pictures), self.batch_size):
            chunk = list(pictures[start : start + self.batch_size])
            # One query for every picture, so the prompts have one length and need no padding.
            inputs = self.processor(chunk, return_tensors="pt", num_image_tokens=self.num_image_tokens)
            inputs = {key: value.to(parameter.device) for key, value in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
            generated = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                tokenizer=self.processor.tokenizer, stop_strings=self.processor.message_end_token,
            )
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            texts += self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        return texts


@register_reward("ocr")
class OcrReward(FrozenModelReward):
    """Similarity of the recognised text to the prompt's quoted text, per image (module docstring).

    Options: ``engine`` (``"tesseract"`` or ``"got_ocr2"``). Tesseract: ``lang`` and
    ``tesseract_config`` (its language, e.g. ``"eng"``, and extra command-line flags, e.g.
    ``"--psm 11"``), ``workers`` (images recognised in parallel). GOT-OCR2: ``model`` (folder or
    hub id, default ``stepfun-ai/GOT-OCR-2.0-hf``), ``max_new_tokens``, ``batch_size`` (images per
    generate call), ``dtype`` (float32, bfloat16, float16), ``device`` (where the model runs;
    default: the images' device). ``recognizer`` (a function PIL image -> text) replaces the
    engine, e.g. in tests.
    """

    def __init__(
        self,
        engine: str = "tesseract",
        lang: str = "eng",
        tesseract_config: str = "",
        workers: int = 4,
        model: str | os.PathLike | None = None,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        dtype: str = "float32",
        device: str | None = None,
        recognizer: Recognizer | None = None,
    ):
        super().__init__()
        if engine not in ENGINES:
            raise RewardConfigError(f"ocr: unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
        if model is not None and engine != "got_ocr2":
            raise RewardConfigError(f"ocr: model is an option of engine got_ocr2, not of {engine}")
        for name, value in (("workers", workers), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise RewardConfigError(f"ocr: {name} must be >= 1, got {value}")
        if dtype not in DTYPES:
            raise RewardConfigError(f"ocr: unknown dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
        try:
            self.device = torch.device(device) if device is not None else None
        except RuntimeError:
            raise RewardConfigError(f"ocr: {device!r} is not a torch device") from None
        self.workers = workers
        self.engine = "custom" if recognizer is not None else engine
        self.recognizer: Recognizer | None = None
        self.reader: GotOcr2Recognizer | None = None
        if recognizer is not None:
            self.recognizer = recognizer
        elif engine == "tesseract":
            self.recognizer = tesseract_recognizer(lang, tesseract_config)
        else:
            self.reader = GotOcr2Recognizer(model or DEFAULT_GOT_OCR2, max_new_tokens, batch_size, dtype)
            if self.device is not None:
                self.to(self.device)
                self.device = next(self.reader.parameters()).device  # "cuda" -> "cuda:0", as compared in score

    def read(self, pictures: Sequence[Image.Image]) -> list[str]:
        """The recognised text of each picture."""
        if self.reader is not None:
            return self.reader(pictures)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.recognizer, pictures))

    def score(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """{"ocr": (B,) in [0, 1], "ocr/exact": (B,) 1 where the target was found} for images (B, 3, H, W)."""
        if self.device is None:
            self.follow(images)
        elif self.reader is not None and next(self.reader.parameters()).device != self.device:
            self.to(self.device)  # moved away, e.g. with the LightningModule
        pictures = [Image.fromarray(array) for array in to_uint8(images)]
        texts = self.read(pictures)
        scores = [text_similarity(text, quoted_text(prompt)) for text, prompt in zip(texts, prompts)]
        return {
            self.name: torch.tensor(scores, dtype=torch.float32, device=images.device),
            f"{self.name}/exact": torch.tensor([float(s == 1.0) for s in scores], device=images.device),
        }
