"""The shapes reward on rendered scenes whose answer is known, and on wrong scenes."""
import copy
import math

import numpy as np
import pytest
import torch

from tpgrpo.rewards import build_reward
from tpgrpo.rewards.shapes import ShapesReward
from tpgrpo.tiny import scenes


def to_images(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def score(records, images=None, seed=0, size=32):
    if images is None:
        images = to_images(scenes.render_batch(records, np.random.default_rng(seed), size=size))
    return ShapesReward()(images, [r["prompt"] for r in records], records)


@pytest.fixture(scope="module")
def random_records():
    everything = [r for records in scenes.all_records().values() for r in records]
    rng = np.random.default_rng(123)
    return [everything[i] for i in rng.integers(len(everything), size=200)]


@pytest.mark.parametrize("size", [32, 64])
def test_matching_scenes_pass(random_records, size):
    out = score(random_records, size=size)
    assert out["shapes/strict"].mean() >= 0.98
    assert out["shapes"].mean() >= 0.99
    assert out["shapes"].shape == out["shapes/strict"].shape == (200,)


def test_upsampled_scenes_pass(random_records):
    images = to_images(scenes.render_batch(random_records, np.random.default_rng(1)))
    up = torch.nn.functional.interpolate(images, scale_factor=2, mode="bilinear")
    assert score(random_records, up)["shapes/strict"].mean() >= 0.97


POSITION = {
    "tag": "position",
    "include": [
        {"class": "triangle", "count": 1, "color": "green"},
        {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]},
    ],
    "prompt": "a photo of a blue square to the left of a green triangle",
}
COUNTING = scenes.all_records()["counting"][0]  # "a photo of two circles"


def variant(record, path, value):
    """A copy of ``record`` with record[path[0]][path[1]]...[-1] = value."""
    out = copy.deepcopy(record)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize(
    "wrong, failing",
    [
        (variant(POSITION, ["include", 1, "color"], "red"), "binding"),
        (variant(POSITION, ["include", 0, "class"], "circle"), "count"),
        (variant(POSITION, ["include", 1, "position"], ["right of", 0]), "position"),
        (variant(POSITION, ["include", 1, "position"], ["above", 0]), "position"),
        (variant(COUNTING, ["include", 0, "count"], 3), "count"),
        (variant(COUNTING, ["include", 0, "count"], 1), "count"),
    ],
)
def test_wrong_scenes_score_lower(wrong, failing):
    right = POSITION if wrong["tag"] == "position" else COUNTING
    for seed in range(5):
        images = to_images(scenes.render_batch([wrong, right], np.random.default_rng(seed)))
        out = score([right, right], images)
        assert out["shapes/strict"].tolist() == [0.0, 1.0]
        assert out["shapes"][0] < out["shapes"][1] == 1.0
        assert out[f"shapes/{failing}"][0] < 1.0


def test_extra_objects_fail_strict():
    two = {"tag": "two_object", "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}],
           "prompt": "a photo of a circle and a square"}
    three = {**two, "include": [*two["include"], {"class": "triangle", "count": 1}]}
    images = to_images(scenes.render_batch([three, two], np.random.default_rng(0)))
    out = score([two, two], images)
    assert out["shapes/strict"].tolist() == [0.0, 1.0]
    assert out["shapes/extra"][0].item() == pytest.approx(2 / 3) and out["shapes/extra"][1].item() == 1.0
    # checks: count circle, count square, extra -> plain mean (1 + 1 + 2/3) / 3; as a factor 1 × 2/3
    assert out["shapes"][0].item() == pytest.approx((2 + 2 / 3) / 3)
    factor = ShapesReward(extra_as_factor=True)(images, [two["prompt"]] * 2, [two, two])
    assert factor["shapes"].tolist() == pytest.approx([2 / 3, 1.0])
    assert torch.equal(factor["shapes/strict"], out["shapes/strict"])


def test_partial_credit_is_graded():
    two_red = {"tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}],
               "exclude": [{"class": "circle", "count": 3, "color": "red"}], "prompt": "a photo of two red circles"}
    one_red = variant(two_red, ["include", 0, "count"], 1)
    one_blue = variant(one_red, ["include", 0, "color"], "blue")
    images = to_images(scenes.render_batch([two_red, one_red, one_blue], np.random.default_rng(0)))
    dense = score([two_red] * 3, images)["shapes"].tolist()
    assert dense[0] == 1.0 > dense[1] > dense[2] > 0.0


def test_scores_in_unit_interval_and_nan_for_missing_checks(random_records):
    noise = torch.rand(len(random_records), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = score(random_records, noise)
    for key, value in out.items():
        finite = value[~torch.isnan(value)]
        assert ((finite >= 0) & (finite <= 1)).all(), key
    assert out["shapes/strict"].mean() <= 0.02  # colour noise must not pass as a scene
    has_position = torch.tensor([any("position" in e for e in r["include"]) for r in random_records])
    assert torch.isnan(out["shapes/position"][~has_position]).all()
    assert not torch.isnan(out["shapes/position"][has_position]).any()


def test_blank_image_scores_zero():
    blank = torch.full((1, 3, 48, 48), 235 / 255)
    out = score([POSITION], blank)
    assert out["shapes/strict"].item() == 0.0 and out["shapes/extra"].item() == 1.0
    assert out["shapes"].item() == pytest.approx(1 / 8)  # only "nothing extra" passes, of 8 checks


def test_batch_shape_errors():
    reward = ShapesReward()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        reward(torch.zeros(3, 32, 32), [POSITION["prompt"]], [POSITION])
    with pytest.raises(ValueError, match="prompts"):
        reward(torch.zeros(2, 3, 32, 32), [POSITION["prompt"]], [POSITION])


@pytest.mark.parametrize(
    "bad, message",
    [
        (variant(POSITION, ["include", 0, "class"], "hexagon"), "unknown class 'hexagon'"),
        (variant(POSITION, ["include", 0, "color"], "teal"), "unknown color 'teal'"),
        (variant(POSITION, ["include", 1, "position"], ["near", 0]), "unknown relation"),
        ({"prompt": "a photo of a cat"}, "no 'include'"),
    ],
)
def test_bad_records_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        ShapesReward()(torch.zeros(1, 3, 32, 32), ["x"], [bad])


def test_registered_and_combined():
    reward = build_reward({"shapes": 2.0})
    images = to_images(scenes.render_batch([POSITION], np.random.default_rng(0)))
    out = reward(images, [POSITION["prompt"]], [POSITION])
    assert out["reward"].item() == 2.0 and math.isclose(out["shapes"].item(), 1.0)
