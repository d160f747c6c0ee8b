"""The OCR reward's engines: RapidOCR with its real PP-OCR weights (shipped in its wheel) on text
rendered in fonts that matplotlib ships, and GOT-OCR2 on a tiny random model built offline."""
import sys
import threading
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from tests.helpers.tiny_models import save_tiny_got_ocr2
from tpgrpo.rewards.base import RewardConfigError, build_reward
from tpgrpo.rewards.clip_models import ModelLoadError
from tpgrpo.rewards.ocr import (
    OcrReward,
    RapidOcrRecognizer,
    got_ocr2_image_tokens,
    join_confident_spans,
    normalise,
    text_similarity,
)

FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
# a dependency of this package where its wheels exist; elsewhere a missing package fails these tests
needs_rapidocr = pytest.mark.skipif(sys.version_info >= (3, 13), reason="rapidocr-onnxruntime supports Python < 3.13")


@pytest.fixture(scope="module")
def tiny_got_ocr2(tmp_path_factory):
    """A folder with a random 1-layer GOT-OCR2 (64-px images, 16 image tokens) and its processor."""
    return save_tiny_got_ocr2(tmp_path_factory.mktemp("tiny_got_ocr2"))


def pictures_batch(count=3, size=40):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_image_tokens_follow_the_vision_grid():
    config = lambda image, patch: type("Vision", (), {"image_size": image, "patch_size": patch})
    assert got_ocr2_image_tokens(config(1024, 16)) == 256  # the released model: 64 -> 32 -> 16 per side
    assert got_ocr2_image_tokens(config(64, 4)) == 16
    assert got_ocr2_image_tokens(config(40, 4)) == 9  # 10 -> 5 -> 3


def test_got_ocr2_reward_scores_in_batches_without_gradients(tiny_got_ocr2, monkeypatch):
    reward = OcrReward(engine="got_ocr2", model=str(tiny_got_ocr2), batch_size=2, max_new_tokens=4)
    model = reward.reader.model
    assert not any(p.requires_grad for p in reward.parameters()) and not model.training
    reward.train()
    assert not model.training  # a LightningModule's train() leaves the reward in eval mode
    calls = []
    original = model.generate

    def spy(**inputs):
        calls.append((tuple(inputs["input_ids"].shape), tuple(inputs["pixel_values"].shape), inputs["max_new_tokens"]))
        return original(**inputs)

    monkeypatch.setattr(model, "generate", spy)
    images = pictures_batch(3)
    out = reward(images, ['a sign "hello"'] * 3)
    assert out["ocr"].shape == out["ocr/exact"].shape == (3,) and out["ocr"].dtype == torch.float32
    assert ((out["ocr"] >= 0) & (out["ocr"] <= 1)).all()
    assert [c[1] for c in calls] == [(2, 3, 64, 64), (1, 3, 64, 64)] and {c[2] for c in calls} == {4}
    assert calls[0][0][1] == calls[1][0][1] > 16  # the query holds the 16 image tokens


def test_recognised_text_is_the_decoded_continuation(tiny_got_ocr2, monkeypatch):
    reward = OcrReward(engine="got_ocr2", model=str(tiny_got_ocr2), batch_size=2)
    tokenizer = reward.reader.processor.tokenizer
    answers = iter(["HELLO<|im_end|>", "He lp<|im_end|><|endoftext|>", "<|im_end|>"])

    def fake_generate(input_ids, **_):
        rows = [tokenizer(next(answers), add_special_tokens=False)["input_ids"] for _ in range(len(input_ids))]
        width = max(map(len, rows))
        rows = [row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
        return torch.cat([input_ids, torch.tensor(rows)], dim=1)

    monkeypatch.setattr(reward.reader.model, "generate", fake_generate)
    pictures = [Image.new("RGB", (40, 40))] * 3
    assert reward.read(pictures) == ["HELLO", "He lp", ""]  # no query text, no special tokens

    answers = iter(["HELLO<|im_end|>", "He lp<|im_end|><|endoftext|>", "<|im_end|>"])
    prompts = ['a sign "hello"', 'a sign that says "help"', 'a sign "open"']
    out = reward(pictures_batch(3), prompts)
    expected = [text_similarity("HELLO", "hello"), text_similarity("He lp", "help"), text_similarity("", "open")]
    assert expected == [1.0, 1.0, 0.0]
    assert out["ocr"].tolist() == expected and out["ocr/exact"].tolist() == [1.0, 1.0, 0.0]


def test_reward_options_select_the_engine(tiny_got_ocr2):
    reward = build_reward(
        {"ocr": 1.0}, {"ocr": {"engine": "got_ocr2", "model": str(tiny_got_ocr2), "dtype": "bfloat16", "device": "cpu"}}
    )
    ocr = reward.rewards["ocr"]
    assert ocr.engine == "got_ocr2" and ocr.reader.model.dtype == torch.bfloat16
    assert ocr.reader.num_image_tokens == 16
    out = reward(pictures_batch(2), ['"a"', '"b"'])
    assert out["ocr"].shape == (2,) and torch.equal(out["reward"], out["ocr"])


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"engine": "paddle"}, RewardConfigError, "ocr: unknown engine 'paddle'; engines: rapidocr, tesseract, got_ocr2"),
        ({"model": "x/y"}, RewardConfigError, r"ocr: model is an option of engine got_ocr2, not of rapidocr"),
        ({"num_threads": 0}, RewardConfigError, r"ocr: num_threads must be >= 1, got 0"),
        ({"device": "mps"}, RewardConfigError, r"ocr: engine rapidocr runs on cpu or cuda, not on mps"),
        ({"engine": "got_ocr2", "max_new_tokens": 0}, RewardConfigError, r"ocr: max_new_tokens must be >= 1, got 0"),
        ({"engine": "got_ocr2", "batch_size": 0}, RewardConfigError, r"ocr: batch_size must be >= 1, got 0"),
        ({"engine": "got_ocr2", "dtype": "int8"}, RewardConfigError, r"ocr: unknown dtype 'int8'"),
        ({"engine": "got_ocr2", "device": "gpu0"}, RewardConfigError, r"ocr: 'gpu0' is not a torch device"),
    ],
)
def test_option_errors(options, error, message):
    with pytest.raises(error, match=message):
        OcrReward(**options)


def test_a_missing_model_folder_is_named(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match=rf"could not load the GOT-OCR2 processor from '{missing}'"):
        OcrReward(engine="got_ocr2", model=str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="could not load the GOT-OCR2 processor"):
        OcrReward(engine="got_ocr2", model=str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------ RapidOCR
@pytest.fixture(scope="module")
def rapidocr():
    """The default OCR reward (RapidOCR on the CPU), its engine loaded once for the module."""
    reward = OcrReward(workers=4)
    assert reward.engine == "rapidocr"
    return reward


def render(text, font="DejaVuSans.ttf", size=48, colour="black", background="white", side=512):
    """``text`` (lines split at newlines) centred on a ``side`` px square, in a matplotlib font."""
    picture = Image.new("RGB", (side, side), background)
    face = ImageFont.truetype(str(FONTS / font), size)
    draw = ImageDraw.Draw(picture)
    draw.multiline_text((side / 2, side / 2), text, fill=colour, font=face, anchor="mm", align="center")
    return picture


def as_images(*pictures):
    """PIL pictures -> the reward's input, (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2).float() / 255


RENDERED = [  # text, font, size in px, colour, background: dark on light and light on dark
    ("hello", "DejaVuSans.ttf", 48, "black", "white"),
    ("Open Late", "DejaVuSerif.ttf", 40, "white", "navy"),
    ("coffee shop", "DejaVuSansMono.ttf", 32, "yellow", "black"),
    ("SALE 50%", "DejaVuSans-Bold.ttf", 64, "red", "white"),
    ("welcome home", "DejaVuSerif-Italic.ttf", 36, "darkgreen", "beige"),
    ("STOP", "DejaVuSans-Bold.ttf", 120, "white", "red"),
    ("fresh bread", "DejaVuSans-Oblique.ttf", 20, "black", "lightyellow"),
    ("Hello World", "STIXGeneral.ttf", 44, "black", "lightgray"),
    ("midnight 2026", "DejaVuSerif-Bold.ttf", 28, "lightgray", "dimgray"),
    ("jazz", "DejaVuSansMono-Bold.ttf", 72, "orange", "purple"),
    ("Tea Time", "STIXGeneralItalic.ttf", 24, "white", "black"),
    ("river", "DejaVuSerif.ttf", 14, "black", "white"),
    ("LUCKY TIGER", "STIXGeneralBol.ttf", 56, "gold", "darkgreen"),
]


@pytest.mark.parametrize("text, font, size, colour, background", RENDERED, ids=[case[0] for case in RENDERED])
@needs_rapidocr
def test_rapidocr_reads_rendered_text(rapidocr, text, font, size, colour, background):
    read = rapidocr.recognizer(render(text, font, size, colour, background))
    assert normalise(read) == normalise(text)  # exactly the text, nothing more (spaces aside)


@needs_rapidocr
def test_rapidocr_reads_lines_in_order_and_nothing_on_a_blank_picture(rapidocr):
    spans = rapidocr.recognizer.spans(render("good\nmorning\nsunshine", size=40))
    assert [text for text, _ in spans] == ["good", "morning", "sunshine"] and all(c > 0.5 for _, c in spans)
    assert rapidocr.recognizer(render("good\nmorning\nsunshine", size=40)) == "goodmorningsunshine"
    assert rapidocr.recognizer.spans(Image.new("RGB", (512, 512), "teal")) == []


@needs_rapidocr
def test_rapidocr_reward_scores_the_quoted_text(rapidocr):
    hello = render("HELLO", "DejaVuSerif-Bold.ttf", 64, "white", "black")
    prompts = ['a sign that says "hello"', 'a sign that says "world"', 'a "good morning" card', 'a sign "hello"']
    pictures = [hello, hello, render("good\nmorning"), Image.new("RGB", (512, 512), "white")]
    out = rapidocr(as_images(*pictures), prompts)
    assert out["ocr"].tolist() == pytest.approx([1.0, text_similarity("hello", "world"), 1.0, 0.0])
    assert text_similarity("hello", "world") == pytest.approx(0.2)
    assert out["ocr/exact"].tolist() == [1.0, 0.0, 1.0, 0.0]
    # read four at a time (workers=4) as one by one
    one_by_one = [rapidocr.recognizer(picture) for picture in pictures]
    assert rapidocr.read(pictures) == one_by_one == ["HELLO", "HELLO", "goodmorning", ""]


def test_join_confident_spans_keeps_every_span_above_zero_in_order():
    assert join_confident_spans([("world", 0.8), ("hello", 0.7)]) == "worldhello"
    assert join_confident_spans([("a", 0.9), ("b", 0.0), ("c", 0.01), ("d", -0.5), ("e f", 1.0)]) == "ace f"
    assert join_confident_spans([("x", 0.0)]) == join_confident_spans([]) == ""


class FakeRapidOCR:
    """Stands in for rapidocr's RapidOCR: records its options and the arrays it is given."""

    made = []

    def __init__(self, **options):
        self.options, self.arrays = options, []
        FakeRapidOCR.made.append(self)

    def __call__(self, array):
        self.arrays.append(array)
        box = [[0, 0], [1, 0], [1, 1], [0, 1]]
        return [[box, "OPEN", 0.93], [box, "late", 0.0], [box, "24", 0.51]], [0.1, 0.0, 0.1]


@needs_rapidocr
def test_recognizer_loads_once_with_the_references_settings_and_passes_the_picture_as_is(monkeypatch):
    monkeypatch.setattr(FakeRapidOCR, "made", [])
    recognizer = RapidOcrRecognizer(num_threads=3)
    monkeypatch.setattr(recognizer, "rapidocr_class", FakeRapidOCR)
    picture = render("x", side=96)
    results = []
    threads = [threading.Thread(target=lambda: results.append(recognizer(picture))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["OPEN24"] * 4  # the span of confidence 0 dropped
    (engine,) = FakeRapidOCR.made
    assert engine.options["use_cls"] is False and engine.options["text_score"] == 0.5
    assert engine.options["intra_op_num_threads"] == 3 and engine.options["det_limit_type"] == "max"
    assert all(array.dtype == np.uint8 and np.array_equal(array, np.asarray(picture)) for array in engine.arrays)


@needs_rapidocr
def test_rapidocr_on_cuda_needs_onnxruntime_gpu():
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    message = (r"ocr: engine rapidocr on cuda:1 needs onnxruntime's CUDAExecutionProvider, which the installed "
               r"onnxruntime lacks \(it has .*CPUExecutionProvider\); install the GPU build: "
               r"pip uninstall -y onnxruntime && pip install onnxruntime-gpu")
    with pytest.raises(RewardConfigError, match=message):
        OcrReward(device="cuda:1")


@needs_rapidocr
def test_rapidocr_sessions_run_on_the_gpu_asked_for(monkeypatch):
    import onnxruntime

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: providers)
    calls = []
    monkeypatch.setattr(onnxruntime.InferenceSession, "set_providers", lambda self, *args: calls.append(args))
    reward = OcrReward(device="cuda:1", workers=2)
    assert reward.device == torch.device("cuda:1") and reward.recognizer.engine is None  # loaded on first use
    reward.recognizer.loaded()
    assert calls == [(providers, [{"device_id": 1}, {}])] * 2  # the detector's and the recogniser's sessions


def test_a_missing_rapidocr_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)
    message = r"^ocr: engine rapidocr needs the package rapidocr-onnxruntime: pip install rapidocr-onnxruntime \(for"
    with pytest.raises(RewardConfigError, match=message):
        OcrReward()
    with pytest.raises(RewardConfigError, match=message):
        build_reward({"ocr": 1.0})
