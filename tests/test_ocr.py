"""The OCR reward's GOT-OCR2 engine, on a tiny random GOT-OCR2 built offline (no weights downloaded)."""
import pytest
import torch
from PIL import Image

from tests.helpers.tiny_models import save_tiny_got_ocr2
from tpgrpo.rewards.base import RewardConfigError, build_reward
from tpgrpo.rewards.clip_models import ModelLoadError
from tpgrpo.rewards.ocr import OcrReward, got_ocr2_image_tokens, text_similarity

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
        ({"engine": "paddle"}, RewardConfigError, r"ocr: unknown engine 'paddle'; engines: tesseract, got_ocr2"),
        ({"model": "x/y"}, RewardConfigError, r"ocr: model is an option of engine got_ocr2, not of tesseract"),
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
