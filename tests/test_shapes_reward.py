"""The shapes reward on rendered scenes whose answer is known, and on wrong scenes."""
import copy
import math

import numpy as np
import pytest
import torch

from tpgrpo.rewards import build_reward
from tpgrpo.rewards.geneval import judge, relations
from tpgrpo.rewards.shapes import Detection, ShapesReward, box, check_record, detect, to_objects
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


# ---------------------------------------------------------------------------------------------
# GenEval's rules (tpgrpo.rewards.geneval.judge) on the shapes world's detections


def test_to_objects_orders_by_area_and_keeps_centres_and_sizes():
    small = Detection("circle", "red", cy=5.0, cx=4.5, h=6.0, w=8.0, area=30)
    big = Detection("circle", "blue", cy=20.0, cx=20.0, h=10.0, w=10.0, area=80)
    tri = Detection("triangle", "green", cy=10.5, cx=25.0, h=9.0, w=9.0, area=40)
    objects = to_objects([small, tri, big])
    assert list(objects) == ["circle", "triangle"]
    assert objects["circle"] == [
        {"box": [15.0, 15.0, 25.0, 25.0], "color": "blue"},
        {"box": [0.5, 2.0, 8.5, 8.0], "color": "red"},  # cx 4.5 +- 4, cy 5 +- 3
    ]
    assert objects["triangle"] == [{"box": [20.5, 6.0, 29.5, 15.0], "color": "green"}]
    assert to_objects([]) == {}
    # the shared relation rule on these boxes: small is left of and above big
    assert relations(box(small), box(big)) == {"left of", "above"}


def test_position_check_uses_the_shared_relation_rule():
    # 10x10 objects 4.01 px apart on x (left of: shrink 2, (4.01 - 2) / 4.01 > 0.5) vs 3.99 px
    record = variant(POSITION, ["include", 1, "color"], "blue")
    target = Detection("triangle", "green", cy=16.0, cx=20.0, h=10.0, w=10.0, area=50)
    for gap, expected in ((4.01, 1.0), (3.99, 0.0)):
        square = Detection("square", "blue", cy=16.0, cx=20.0 - gap, h=10.0, w=10.0, area=100)
        assert check_record([target, square], record)["position"] == [expected]
        assert judge(record, to_objects([target, square])).strict == bool(expected)


def draw(layouts):
    return to_images(scenes.draw(layouts))


TWO_RED = {"tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}],
           "exclude": [{"class": "circle", "count": 3, "color": "red"}], "prompt": "a photo of two red circles"}
SAME_CLASS = {
    "tag": "position",
    "include": [{"class": "circle", "count": 1, "color": "red"},
                {"class": "circle", "count": 1, "color": "blue", "position": ["left of", 0]}],
    "prompt": "a photo of a blue circle to the left of a red circle",
}


@pytest.mark.parametrize(
    "record, layout, correct, strict",
    [
        # two large red circles and a smaller blue one: GenEval takes the two largest (red) -> correct,
        # but three circles are not exactly two
        (TWO_RED, [("circle", "red", 8, 8, 10), ("circle", "red", 24, 8, 10), ("circle", "blue", 16, 24, 8)], 1, 0),
        # the blue circle is the largest: it is among the two taken and is not red
        (TWO_RED, [("circle", "red", 8, 8, 10), ("circle", "red", 24, 8, 8), ("circle", "blue", 16, 24, 11)], 0, 0),
        (TWO_RED, [("circle", "red", 8, 8, 10), ("circle", "red", 24, 8, 10)], 1, 1),
        # three red circles reach the exclude clause
        (TWO_RED, [("circle", "red", 8, 8, 10), ("circle", "red", 24, 8, 10), ("circle", "red", 16, 24, 10)], 0, 0),
        (POSITION, [("square", "blue", 7, 16, 9), ("triangle", "green", 25, 16, 9)], 1, 1),
        (POSITION, [("square", "blue", 25, 16, 9), ("triangle", "green", 7, 16, 9)], 0, 0),
        (POSITION, [("square", "blue", 7, 16, 9), ("triangle", "green", 25, 16, 9), ("circle", "red", 16, 4, 6)], 1, 1),
        (POSITION, [], 0, 0),
        # GenEval's clauses are by class: with two circles each count-1 circle clause sees both,
        # so a same-class record never passes GenEval's rules, though the scene is right
        (SAME_CLASS, [("circle", "blue", 7, 16, 10), ("circle", "red", 25, 16, 11)], 0, 0),
    ],
)
def test_geneval_entries_follow_judge(record, layout, correct, strict):
    images = draw([layout])
    found = detect(images)[0]
    assert sorted((d.shape, d.color) for d in found) == sorted(obj[:2] for obj in layout)  # detected as drawn
    out = score([record], images)
    assert out["shapes/geneval_correct"].tolist() == [float(correct)]
    assert out["shapes/geneval_strict"].tolist() == [float(strict)]
    verdict = judge(record, to_objects(detect(images)[0]))
    assert (verdict.correct, verdict.strict) == (bool(correct), bool(strict))


def test_geneval_entries_next_to_the_shapes_checks():
    layouts = [
        [("circle", "blue", 7, 16, 10), ("circle", "red", 25, 16, 11)],  # SAME_CLASS, right scene
        [("circle", "red", 8, 8, 10), ("circle", "red", 24, 8, 10), ("circle", "blue", 16, 24, 8)],  # TWO_RED + 1
    ]
    out = score([SAME_CLASS, TWO_RED], draw(layouts))
    assert out["shapes/strict"].tolist() == [1.0, 0.0]  # the extra blue circle fails "extra"
    assert out["shapes/geneval_correct"].tolist() == [0.0, 1.0]
    assert out["shapes/geneval_strict"].tolist() == [0.0, 0.0]


def test_geneval_entries_on_matching_scenes(random_records):
    out = score(random_records)
    different = torch.tensor([len({e["class"] for e in r["include"]}) == len(r["include"]) for r in random_records])
    # matching scenes pass GenEval's rules unless two clauses share a class (see above)
    assert out["shapes/geneval_strict"][different].mean() >= 0.98
    assert (out["shapes/geneval_correct"] >= out["shapes/geneval_strict"]).all()
    assert (out["shapes/geneval_correct"][~different] == 0).all()


def test_the_reward_package_never_imports_the_demo_world():
    """`tpgrpo.tiny` uses `tpgrpo.rewards` (the shapes world's vocabulary lives with its reward), never the reverse."""
    import ast
    from pathlib import Path

    import tpgrpo.rewards

    for path in Path(tpgrpo.rewards.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name.startswith("tpgrpo.tiny") for name in names), f"{path.name} imports {names}"


def test_color_map_stays_on_the_images_device():
    # the meta device stands in for a GPU: a palette table left on the CPU cannot be indexed from it
    from tpgrpo.rewards.shapes import color_map

    colors = color_map(torch.rand(2, 3, 8, 8, device="meta"), chroma_threshold=0.3)
    assert colors.device.type == "meta" and colors.shape == (2, 8, 8) and colors.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_scores_of_gpu_images_equal_those_on_the_cpu(random_records):
    records = random_records[:8]
    images = to_images(scenes.render_batch(records, np.random.default_rng(0), size=32))
    on_gpu = score(records, images.cuda())
    for key, value in score(records, images).items():
        torch.testing.assert_close(on_gpu[key].cpu(), value, equal_nan=True)
