"""The `geneval` reward (Mask2Former + CLIP colours + GenEval's rules) and the server scoring with it.

The models are tiny random ones built here and saved with save_pretrained: a Mask2Former on a
tiny Swin whose class head is biased so that every query is a confident "dog" (about 0.51:
above GenEval's threshold 0.3, below its counting threshold 0.9), and a 1-layer CLIP with a
word-level tokenizer. The pure helpers are checked on hand-made inputs.
"""
import math
import threading

import numpy as np
import pytest
import torch

from tpgrpo.rewards import REWARDS, build_reward
from tpgrpo.rewards import geneval_detector as gd
from tpgrpo.rewards.base import RewardConfigError
from tpgrpo.rewards.clip_models import ModelLoadError
from tpgrpo.rewards.geneval import TAGS, judge
from tpgrpo.rewards.geneval_detector import (
    COLORS,
    GENEVAL_OBJECTS,
    GenEvalReward,
    classify_colors,
    color_classifier,
    color_prompts,
    map_labels,
    mask_box,
    masked_crop,
    select_detections,
    validate_geneval_record,
)
from tpgrpo.rewards.geneval import geneval_overall
from tpgrpo.rewards.geneval_http import GenEvalHttpReward, GenEvalServerError
from tpgrpo.rewards.geneval_server import ScoringServer, build_scorer, main
from tests.helpers.tiny_models import COCO_LABELS, save_tiny_detector, save_tiny_geneval_clip as save_tiny_clip

FIELDS = ["geneval", "geneval/strict", "geneval/correct"] + [f"geneval/{tag}" for tag in TAGS]


def record(tag, *include, exclude=()):
    return {"tag": tag, "include": list(include), "exclude": list(exclude), "prompt": tag}


RECORDS = [
    record("single_object", {"class": "dog", "count": 1}),
    record("counting", {"class": "dog", "count": 2}),
    record("colors", {"class": "dog", "count": 1, "color": "red"}),
    record("two_object", {"class": "dog", "count": 1}, {"class": "cat", "count": 1}),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(detector folder, CLIP folder)."""
    return (save_tiny_detector(tmp_path_factory.mktemp("mask2former")), save_tiny_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def reward(models):
    return GenEvalReward(detector=models[0], clip=models[1], detector_size=None)  # the tiny processor's 64 px: fast


def images(count=4, size=48, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- label mapping
def test_object_names_are_genevals_80():
    assert len(GENEVAL_OBJECTS) == len(set(GENEVAL_OBJECTS)) == 80
    assert {"computer mouse", "tv remote", "computer keyboard", "motorcycle", "couch"} <= set(GENEVAL_OBJECTS)
    assert not {"mouse", "remote", "keyboard"} & set(GENEVAL_OBJECTS)


def test_map_labels_maps_coco_spellings_onto_geneval_names():
    mapped = map_labels(dict(enumerate(COCO_LABELS)))
    assert [mapped[i] for i in range(80)] == list(GENEVAL_OBJECTS)
    # Pascal VOC spellings, case, underscores, and ids that are not 0..79
    variants = {"motorcycle": "Motorbike", "airplane": "aeroplane", "couch": "sofa", "potted plant": "pottedplant",
                "dining table": "dining_table", "tv": "tvmonitor", "computer mouse": "mouse",
                "hair drier": "hair-dryer"}
    labels = {100 + i: variants.get(name, name.upper()) for i, name in enumerate(GENEVAL_OBJECTS)}
    assert map_labels(labels) == {100 + i: name for i, name in enumerate(GENEVAL_OBJECTS)}


def test_map_labels_errors():
    unknown = r"2 of the detector's 81 class labels are not COCO objects .*'wall', 'sky'"
    with pytest.raises(RewardConfigError, match=unknown):
        map_labels({**dict(enumerate(COCO_LABELS[:79])), 79: "wall", 80: "sky"})
    with pytest.raises(RewardConfigError, match="no label for 'toothbrush'"):
        map_labels(dict(enumerate(COCO_LABELS[:79])))
    with pytest.raises(RewardConfigError, match="several labels map to 'tv'"):
        map_labels({**dict(enumerate(COCO_LABELS)), 80: "tvmonitor"})


def test_a_detector_with_unmappable_labels_is_refused(models, tmp_path):
    other = save_tiny_detector(tmp_path / "other", labels=[f"thing{i}" for i in range(80)])
    with pytest.raises(RewardConfigError, match=r"80 of the detector's 80 class labels .*'thing0', 'thing1'"):
        GenEvalReward(detector=other, clip=models[1])


def test_missing_weights_give_a_clear_error(models, tmp_path):
    with pytest.raises(ModelLoadError, match=r"could not load the GenEval detector's image processor from '.*nothing'"):
        GenEvalReward(detector=tmp_path / "nothing", clip=models[1])
    with pytest.raises(ModelLoadError, match="could not load the GenEval CLIP processor"):
        GenEvalReward(detector=models[0], clip=tmp_path / "nothing")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(threshold=1.0), "threshold and counting_threshold must be in"),
        (dict(max_per_class=0), "max_per_class, clip_batch_size and detector_batch_size must be >= 1"),
        (dict(dtype="float64"), "dtype must be one of float32, float16, bfloat16"),
        (dict(device="gpu:0"), "device 'gpu:0' is not a torch device"),
        (dict(position_threshold=-1), "position_threshold must be >= 0"),
        (dict(detector_size={"shortest_edge": 800}), "detector_size must be {shortest_edge: int, longest_edge: int}"),
        (dict(detector_size={"shortest_edge": 900, "longest_edge": 800}), "1 <= shortest_edge <= longest_edge"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(RewardConfigError, match=message):
        GenEvalReward(detector="unused", clip="unused", **options)


def test_records_must_use_genevals_objects_and_colours():
    assert validate_geneval_record(RECORDS[2]) is RECORDS[2]
    with pytest.raises(ValueError, match="include\\[0\\] has class 'circle', not one of GenEval's 80 objects"):
        validate_geneval_record(record("single_object", {"class": "circle", "count": 1}))
    with pytest.raises(ValueError, match="exclude\\[0\\] has colour 'teal'"):
        teal = {"class": "dog", "count": 2, "color": "teal"}
        validate_geneval_record(record("counting", {"class": "dog", "count": 1}, exclude=[teal]))
    with pytest.raises(ValueError, match="count"):
        validate_geneval_record(record("counting", {"class": "dog", "count": 0}))


# ------------------------------------------------------------------------------- pure helpers
def test_mask_box_and_masked_crop_on_a_hand_made_mask():
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = mask[2, 1:4] = True  # an L: rows 1-2, columns 1-3
    assert mask_box(mask) == (1, 1, 4, 3)
    crop = masked_crop(image, mask, mask_box(mask))
    assert crop.shape == (2, 3, 3) and crop.dtype == np.uint8
    grey = [153, 153, 153]
    assert crop[0, 0].tolist() == image[1, 1].tolist()
    assert crop[0, 1].tolist() == grey and crop[0, 2].tolist() == grey
    assert crop[1].tolist() == image[2, 1:4].tolist()
    with pytest.raises(ValueError, match="empty mask"):
        mask_box(np.zeros((3, 3), bool))


def test_select_detections_thresholds_orders_and_caps_per_class():
    names = {0: "dog", 1: "cat"}
    masks = np.zeros((6, 4, 4), bool)
    for k in range(6):
        masks[k, k % 4, k % 4] = True
    masks[5] = False  # an empty mask is never kept
    segments = [
        {"label_id": 0, "score": 0.40},
        {"label_id": 0, "score": 0.95},
        {"label_id": 1, "score": 0.30},  # not above 0.3
        {"label_id": 0, "score": 0.60},
        {"label_id": 1, "score": 0.31},
        {"label_id": 1, "score": 0.99},
    ]
    kept = select_detections(segments, masks, names, threshold=0.3, max_per_class=16)
    assert [d.score for d in kept["dog"]] == [0.95, 0.60, 0.40]
    assert [d.box for d in kept["dog"]] == [(1, 1, 2, 2), (3, 3, 4, 4), (0, 0, 1, 1)]
    assert [d.score for d in kept["cat"]] == [0.31]
    assert [d.score for d in select_detections(segments, masks, names, 0.3, max_per_class=2)["dog"]] == [0.95, 0.60]
    assert [d.score for d in select_detections(segments, masks, names, 0.9, 16)["dog"]] == [0.95]
    assert select_detections(segments, masks, names, 0.96, 16) == {}
    with pytest.raises(ValueError, match="6 segments but 2 masks"):
        select_detections(segments, masks[:2], names, 0.3, 16)


def test_colour_classifier_averages_unit_template_embeddings_then_picks_the_closest():
    e = torch.eye(12)
    text = torch.zeros(10, 3, 12)
    text[0] = torch.stack([100 * e[1], e[0], e[0]])  # red: unit mean ~ 2 e0 + e1 (a raw mean: mostly e1)
    text[1] = torch.stack([e[1], 3 * e[1], e[1]])  # orange: e1
    for k in range(2, 10):
        text[k] = torch.stack([e[k + 2], e[k + 2], -e[0]])  # others: orthogonal to e1, away from e0
    classifier = color_classifier(text)
    assert classifier.shape == (10, 12)
    assert torch.allclose(classifier[0], (2 * e[0] + e[1]) / math.sqrt(5))
    assert torch.allclose(classifier[1], e[1])
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(10))
    assert classify_colors(torch.stack([3 * e[0], e[1], e[6] + 0.1 * e[0]]), classifier) == ["red", "orange", "blue"]


def test_colour_prompts_are_the_three_templates_per_colour():
    prompts = color_prompts("fire hydrant")
    assert len(prompts) == 30
    assert prompts[:3] == [
        "a photo of a red fire hydrant", "a photo of a red-colored fire hydrant", "a photo of a red object"
    ]
    assert prompts[-1] == "a photo of a white object"


def test_geneval_overall_is_the_mean_over_tags_of_the_correct_rates():
    means = {"single_object": 1.0, "two_object": 0.5, "counting": 0.25, "colors": 0.75, "position": 0.0,
             "color_attr": 0.5}
    assert geneval_overall(means) == pytest.approx(3.0 / 6)
    columns = {f"geneval/{tag}": value for tag, value in means.items()} | {"geneval": 0.9}  # the reward's columns
    assert geneval_overall(columns) == pytest.approx(0.5)
    assert geneval_overall({"counting": 0.2, "colors": 0.4, "position": math.nan}) == pytest.approx(0.3)
    assert math.isnan(geneval_overall({"geneval": 1.0}))


# ------------------------------------------------------------------------------------ the reward
def test_reward_is_registered_and_built_from_options(models):
    assert REWARDS["geneval"] is GenEvalReward
    built = build_reward({"geneval": 1.0}, {"geneval": {"detector": models[0], "clip": models[1], "max_per_class": 2}})
    assert isinstance(built.rewards["geneval"], GenEvalReward) and built.rewards["geneval"].max_per_class == 2


def test_batch_keys_shapes_ranges_and_tags(reward):
    out = reward(images(), [r["prompt"] for r in RECORDS], RECORDS)
    assert sorted(out) == sorted(FIELDS)
    for key, values in out.items():
        assert values.shape == (4,) and values.dtype == torch.float32, key
    assert ((out["geneval"] >= 0) & (out["geneval"] <= 1)).all()
    for key in ("geneval/strict", "geneval/correct"):
        assert set(out[key].tolist()) <= {0.0, 1.0}
    assert (out["geneval/strict"] <= out["geneval/correct"]).all()
    for tag in TAGS:
        for i, r in enumerate(RECORDS):
            value = out[f"geneval/{tag}"][i].item()
            assert (value == out["geneval/correct"][i].item()) if r["tag"] == tag else math.isnan(value)
    # every query is a "dog" at about 0.51: 8 dogs, none for the counting record (threshold 0.9)
    assert out["geneval/correct"][0] == 1 and out["geneval/strict"][0] == 0 and out["geneval"][0] == 0  # 8 dogs, not 1
    assert out["geneval/correct"][1] == 0 and out["geneval"][1] == 0
    assert out["geneval/correct"][3] == 0 and out["geneval"][3] == pytest.approx(0.0)  # no cat; 8 dogs for 1


def test_scores_are_judge_on_the_detected_objects(reward):
    batch = images(seed=1)
    objects = reward.objects(batch, RECORDS)
    assert [sorted(o) for o in objects] == [["dog"], [], ["dog"], ["dog"]]
    assert [len(o.get("dog", [])) for o in objects] == [8, 0, 8, 8]
    assert all(d["color"] is None for d in objects[0]["dog"])  # no clause asks a colour
    assert all(d["color"] in COLORS for d in objects[2]["dog"])  # the colours record
    for detections in objects:
        for d in detections.get("dog", []):
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
    out = reward(batch, [r["prompt"] for r in RECORDS], RECORDS)
    for i, (r, o) in enumerate(zip(RECORDS, objects)):
        verdict = judge(r, o)
        assert out["geneval"][i].item() == pytest.approx(verdict.score)
        assert out["geneval/correct"][i].item() == verdict.correct and out["geneval/strict"][i].item() == verdict.strict


def test_max_per_class_and_thresholds_are_options(models):
    one = GenEvalReward(detector=models[0], clip=models[1], max_per_class=1, counting_threshold=0.3)
    out = one(images(), [r["prompt"] for r in RECORDS], RECORDS)
    assert out["geneval/strict"][0] == 1 and out["geneval"][0] == 1  # exactly one dog now
    assert out["geneval"][1] == pytest.approx(0.5)  # counting: one dog of two, found at threshold 0.3
    none = GenEvalReward(detector=models[0], clip=models[1], threshold=0.6)
    assert none(images(1), ["p"], RECORDS[:1])["geneval/correct"].tolist() == [0.0]


def test_models_are_loaded_once_and_kept_frozen(models, monkeypatch):
    loads = []
    original = gd.load_pretrained
    def counted(loader, path, what):
        loads.append(what)
        return original(loader, path, what)

    monkeypatch.setattr(gd, "load_pretrained", counted)
    reward = GenEvalReward(detector=models[0], clip=models[1], clip_batch_size=3)  # several CLIP chunks of crops
    assert len(loads) == 4
    for seed in range(3):
        reward(images(2, seed=seed), ["a", "b"], RECORDS[2:4])
    assert len(loads) == 4
    reward.train()
    assert not reward.training and not reward.detector.training and not reward.clip.training
    assert not any(p.requires_grad for p in reward.parameters())


def test_device_option_places_the_models_there(models, monkeypatch):
    fixed = GenEvalReward(detector=models[0], clip=models[1], device="cpu")
    following = GenEvalReward(detector=models[0], clip=models[1])
    assert {p.device for p in fixed.parameters()} == {torch.device("cpu")}
    moves = []
    for reward in (fixed, following):
        monkeypatch.setattr(reward, "to", lambda device, reward=reward: moves.append((reward, device)))
    elsewhere = torch.empty(1, 3, 8, 8, device="meta")
    fixed._place(elsewhere)  # stays on its device whatever the images'
    following._place(elsewhere)  # follows the images
    assert moves == [(following, torch.device("meta"))]
    out = fixed(images(1), ["p"], RECORDS[:1])
    assert all(value.device == torch.device("cpu") for value in out.values())


def test_bad_records_are_refused_by_the_reward(reward):
    with pytest.raises(ValueError, match="metadata 1 is not a GenEval record: include\\[0\\] has class 'circle'"):
        reward(images(2), ["a", "b"], [RECORDS[0], record("single_object", {"class": "circle", "count": 1})])


# ------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def geneval_server(models):
    reward, validate = build_scorer("geneval", detector=models[0], clip=models[1])
    server = ScoringServer("127.0.0.1", 0, reward=reward, validate=validate)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", reward
    server.shutdown()
    server.server_close()


def test_server_with_the_geneval_scorer_answers_the_client(geneval_server):
    url, reward = geneval_server
    batch, prompts = images(), [r["prompt"] for r in RECORDS]
    remote = GenEvalHttpReward(url=url, batch_size=3)(batch, prompts, RECORDS)  # two requests
    local = reward(batch, prompts, RECORDS)
    assert sorted(remote) == sorted(key.replace("geneval", "geneval_http", 1) for key in FIELDS)
    assert remote["geneval_http"].shape == (4,)
    assert torch.allclose(remote["geneval_http"], local["geneval"])
    assert torch.equal(remote["geneval_http/strict"], local["geneval/strict"])
    for tag in TAGS:
        assert torch.equal(remote[f"geneval_http/{tag}"].isnan(), local[f"geneval/{tag}"].isnan())
        assert torch.equal(remote[f"geneval_http/{tag}"].nan_to_num(), local[f"geneval/{tag}"].nan_to_num())


def test_server_with_the_geneval_scorer_rejects_bad_records(geneval_server):
    url, _ = geneval_server
    client = GenEvalHttpReward(url=url, tries=3, backoff=0.01)
    shapes_record = record("single_object", {"class": "circle", "count": 1})
    refused = r"HTTP 400 .*attempt 1 of 3.*metadata 0 is not a GenEval record: include\[0\] has class 'circle'"
    with pytest.raises(GenEvalServerError, match=refused):
        client(images(1), ["a circle"], [shapes_record])


def test_server_command_line_reports_missing_models(tmp_path, capsys):
    with pytest.raises(SystemExit, match="error: could not load the GenEval detector's image processor"):
        main(["--scorer", "geneval", "--detector", str(tmp_path / "none"), "--device", "cpu", "--port", "0"])
    with pytest.raises(ValueError, match="unknown scorer 'yolo'"):
        build_scorer("yolo")


def _detector_input_sizes(reward, monkeypatch, pictures):
    """The (height, width) of the pixels that reach the detector when ``reward`` scores ``pictures``."""
    seen = []
    forward = reward.detector.forward

    def recorded(pixel_values, pixel_mask=None, **kwargs):
        seen.append(tuple(pixel_values.shape[-2:]))
        return forward(pixel_values=pixel_values, pixel_mask=pixel_mask, **kwargs)

    monkeypatch.setattr(reward.detector, "forward", recorded)
    reward(pictures, ["p"] * len(pictures), RECORDS[: len(pictures)])
    return seen


@pytest.mark.parametrize(
    "side, size, expected",
    [
        (48, gd.GENEVAL_DETECTOR_SIZE, (800, 800)),  # GenEval's default: a square image's side becomes 800
        (48, {"shortest_edge": 64, "longest_edge": 96}, (64, 64)),
        (48, None, (64, 64)),  # the processor's own size (the tiny detector's processor says 64)
    ],
)
def test_the_configured_detector_size_reaches_the_model(models, monkeypatch, side, size, expected):
    reward = GenEvalReward(detector=models[0], clip=models[1], detector_size=size)
    assert _detector_input_sizes(reward, monkeypatch, images(1, size=side)) == [expected]


def test_a_wide_image_keeps_its_aspect_until_the_longer_edge_cap(models, monkeypatch):
    reward = GenEvalReward(detector=models[0], clip=models[1], detector_size={"shortest_edge": 64, "longest_edge": 96})
    wide = torch.rand(1, 3, 20, 60, generator=torch.Generator().manual_seed(0))
    # 20 -> 64 would make the long side 192 > 96, so the long side is capped: 60 -> 96, 20 -> 32;
    # both are multiples of the processor's size_divisor (32), so no padding is added
    assert _detector_input_sizes(reward, monkeypatch, wide) == [(32, 96)]
