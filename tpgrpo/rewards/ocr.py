"""OCR reward of Flow-GRPO's text-rendering task: does the image show the text quoted in the prompt?

The target is the text between double quotes in the prompt (all quoted parts, in order; Flow-GRPO's
prompts have one, and a prompt without quotes is its own target, as in Flow-GRPO). The recognised
text comes from an OCR engine (below). Both are lower-cased and stripped of whitespace, then

    score = 1 - min(d, len(target)) / len(target)    in [0, 1]

with d = 0 when the target occurs in the recognised text (extra text costs nothing), else the
Levenshtein distance between the two; an empty target scores 1.

Engines (option ``engine``):

- ``"rapidocr"`` (default): PaddleOCR's PP-OCR text detector and recogniser, the OCR that
  Flow-GRPO, TurningPoint-GRPO and Flow-Factory score with, as the ONNX models that the
  ``rapidocr-onnxruntime`` wheel ships (a dependency of this package; nothing is downloaded at run
  time), run by onnxruntime: on the CPU, or on a GPU through onnxruntime's CUDA provider once
  ``onnxruntime-gpu`` replaces ``onnxruntime``. It reads an image as the references' PaddleOCR
  call does: the RGB uint8 array as it is (no resize or colour conversion of ours; like PaddleOCR,
  RapidOCR takes an array to be in OpenCV's BGR order, and the references hand it RGB, so this
  does too), no angle classifier (``cls=False``), PaddleOCR's detector settings and its drop of
  spans scored under 0.5; the recognised text is that of every remaining span with confidence
  above 0, in reading order, joined without a separator (`join_confident_spans`). What differs:
  the wheel's models are PP-OCRv4's Chinese-and-English detector and recogniser, where the
  references' ``lang="en"`` loads PaddleOCR's English PP-OCRv3 detector and PP-OCRv4 recogniser;
  and PaddleOCR's detector shrinks images longer than 960 px to 960 px, RapidOCR only those
  longer than 2000 px.
- ``"tesseract"`` (no model weights, runs on the CPU): ``pytesseract`` and the system package
  ``tesseract-ocr``: ``pip install -e .[ocr]`` and ``make install-ocr``.
- ``"got_ocr2"``: GOT-OCR 2.0 (Wei et al., 2024) through transformers' native
  ``GotOcr2ForConditionalGeneration``, hub id ``stepfun-ai/GOT-OCR-2.0-hf`` (or a folder saved with
  ``save_pretrained``), in its plain-text mode ("OCR: "), batched, greedy, without gradients,
  loaded once. Chosen over Florence-2 (also native in transformers 5) because it is a model for
  OCR alone, trained on scene text as well as documents, and its plain mode returns just the
  text, with no task tokens or regions to strip; its ``-hf`` checkpoint is published for the
  native class by the model's authors, while Florence-2's own checkpoints need
  ``trust_remote_code`` and the native class needs community conversions.

Config (``model.rewards``)::

    ocr: {weight: 1.0}                                          # rapidocr on the CPU
    ocr: {weight: 1.0, engine: rapidocr, device: cuda, workers: 8}
    ocr: {weight: 1.0, engine: tesseract, lang: eng}
    ocr: {weight: 1.0, engine: got_ocr2, model: stepfun-ai/GOT-OCR-2.0-hf, dtype: bfloat16,
          batch_size: 16, max_new_tokens: 64}
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np
import torch
from PIL import Image

from tpgrpo.images import to_uint8
from tpgrpo.rewards.base import RewardConfigError, register_reward
from tpgrpo.rewards.clip_models import FrozenModelReward, freeze, load_pretrained

Recognizer = Callable[[Image.Image], str]
INSTALL_HINT = "install with `pip install -e .[ocr]` and `apt-get install tesseract-ocr` (or `make install-ocr`)"
RAPIDOCR_INSTALL = "pip install rapidocr-onnxruntime"
ONNXRUNTIME_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
ENGINES: tuple[str, ...] = ("rapidocr", "tesseract", "got_ocr2")
DEFAULT_GOT_OCR2 = "stepfun-ai/GOT-OCR-2.0-hf"
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# PaddleOCR 2.x's defaults, which the references ran with: its detector's settings (RapidOCR's own
# differ) and its drop of recognised spans scored under 0.5 (``drop_score``; RapidOCR's ``text_score``).
PADDLEOCR_DETECTOR = {"det_limit_type": "max", "det_thresh": 0.3, "det_box_thresh": 0.6,
                      "det_unclip_ratio": 1.5, "det_use_dilation": False, "det_score_mode": "fast"}
PADDLEOCR_DROP_SCORE = 0.5


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


def join_confident_spans(spans: Iterable[tuple[str, float]]) -> str:
    """The text of the (text, confidence) spans with confidence above 0, in their order, joined
    without a separator: the references' reading of PaddleOCR's result."""
    return "".join(text for text, confidence in spans if confidence > 0)


def import_rapidocr() -> type:
    """The ``RapidOCR`` class of rapidocr-onnxruntime; a one-line `RewardConfigError` when it does not import."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ModuleNotFoundError as error:
        if error.name != "rapidocr_onnxruntime":
            missing = f"ocr: rapidocr-onnxruntime needs {error.name}, which is missing"
            raise RewardConfigError(f"{missing}: {RAPIDOCR_INSTALL}") from None
        raise RewardConfigError(
            f"ocr: engine rapidocr needs the package rapidocr-onnxruntime: {RAPIDOCR_INSTALL} (for Python < 3.13; "
            "engines tesseract and got_ocr2 do without it)"
        ) from None
    except ImportError as error:
        hint = "; replace opencv-python with opencv-python-headless" if "libGL" in str(error) else ""
        raise RewardConfigError(f"ocr: rapidocr-onnxruntime does not import ({error}){hint}") from None
    return RapidOCR


def check_cuda_provider(device: torch.device) -> None:
    """A one-line `RewardConfigError` unless onnxruntime has its CUDA provider (onnxruntime-gpu's) for ``device``."""
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise RewardConfigError(
            f"ocr: engine rapidocr on {device} needs onnxruntime's CUDAExecutionProvider, which the installed "
            f"onnxruntime lacks (it has {', '.join(providers)}); install the GPU build: {ONNXRUNTIME_GPU_INSTALL}"
        )


def onnx_sessions(engine) -> list:
    """The onnxruntime sessions of a RapidOCR engine that the reward runs: the detector's and the recogniser's."""
    return [engine.text_det.infer.session, engine.text_rec.session.session]


class RapidOcrRecognizer:
    """RapidOCR read as the references read PaddleOCR (module docstring): PIL picture -> text.

    The engine is loaded on the first call (once, also when threads call together) and then
    shared: onnxruntime sessions may run from several threads at once, and the one state RapidOCR
    keeps per call, the detector's resize step, is chosen from the picture's size, which the
    pictures of one reward batch share. ``num_threads`` is each session's intra-op threads on the
    CPU. On CUDA the sessions run on ``device``'s GPU, or on the current one when it has no index.
    """

    def __init__(self, device: torch.device = torch.device("cpu"), num_threads: int = 1):
        if device.type not in ("cpu", "cuda"):
            raise RewardConfigError(f"ocr: engine rapidocr runs on cpu or cuda, not on {device}")
        self.rapidocr_class = import_rapidocr()
        if device.type == "cuda":
            check_cuda_provider(device)
        self.device = device
        self.num_threads = num_threads
        self.engine = None
        self.loading = threading.Lock()

    def load(self):
        """A RapidOCR engine with the references' settings, its sessions on ``self.device``."""
        engine = self.rapidocr_class(
            use_cls=False, text_score=PADDLEOCR_DROP_SCORE, intra_op_num_threads=self.num_threads, **PADDLEOCR_DETECTOR
        )
        if self.device.type == "cuda":
            # RapidOCR's own CUDA switch always takes GPU 0; each process of a multi-GPU run needs its own
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            for session in onnx_sessions(engine):
                session.set_providers(["CUDAExecutionProvider", "CPUExecutionProvider"], [{"device_id": index}, {}])
        return engine

    def loaded(self):
        with self.loading:
            if self.engine is None:
                self.engine = self.load()
        return self.engine

    def spans(self, picture: Image.Image) -> list[tuple[str, float]]:
        """(text, confidence) of each span RapidOCR recognises in ``picture``, in reading order."""
        rows, _ = self.loaded()(np.asarray(picture.convert("RGB")))
        return [(text, float(confidence)) for _box, text, confidence in rows or []]

    def __call__(self, picture: Image.Image) -> str:
        return join_confident_spans(self.spans(picture))


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

    Options: ``engine`` (``"rapidocr"``, ``"tesseract"`` or ``"got_ocr2"``). RapidOCR: ``device``
    (``"cpu"``, the default, or ``"cuda"``/``"cuda:N"``: onnxruntime's CUDA provider, which
    ``onnxruntime-gpu`` brings; ``"cuda"`` is the current GPU), ``num_threads`` (each ONNX session's
    CPU threads) and ``workers`` (images recognised in parallel, so about ``workers * num_threads``
    CPU threads). Tesseract: ``lang`` and ``tesseract_config`` (its language, e.g. ``"eng"``, and
    extra command-line flags, e.g. ``"--psm 11"``), ``workers``. GOT-OCR2: ``model`` (folder or
    hub id, default ``stepfun-ai/GOT-OCR-2.0-hf``), ``max_new_tokens``, ``batch_size`` (images per
    generate call), ``dtype`` (float32, bfloat16, float16), ``device`` (where the model runs;
    default: the images' device). ``recognizer`` (a function PIL image -> text) replaces the
    engine, e.g. in tests.
    """

    def __init__(
        self,
        engine: str = "rapidocr",
        lang: str = "eng",
        tesseract_config: str = "",
        workers: int = 4,
        num_threads: int = 1,
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
        counts = {"workers": workers, "num_threads": num_threads,
                  "max_new_tokens": max_new_tokens, "batch_size": batch_size}
        for name, value in counts.items():
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
        elif engine == "rapidocr":
            self.device = self.device or torch.device("cpu")
            self.recognizer = RapidOcrRecognizer(self.device, num_threads)
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
