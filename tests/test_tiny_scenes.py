"""Synthetic shape scenes: records, prompts, the train/test split, rendering, evaluation summary."""
import numpy as np
import pytest
import torch

from tpgrpo.tiny import scenes
from tpgrpo.tiny.components import build_tokenizer
from tpgrpo.tiny.evaluate import summarize


def test_prompts_follow_the_records():
    records = scenes.all_records()
    assert records["counting"][0]["prompt"] == "a photo of two circles"
    position = next(r for r in records["position"] if r["include"][1]["position"][0] == "left of")
    first, second = position["include"]
    assert position["prompt"] == (
        f"a photo of a {second['color']} {second['class']} to the left of a {first['color']} {first['class']}"
    )
    assert all(r["prompt"].startswith("a photo of ") for rs in records.values() for r in rs)


def test_every_prompt_fits_the_tokenizer_untruncated():
    tok = build_tokenizer()
    prompts = [r["prompt"] for rs in scenes.all_records().values() for r in rs]
    ids = tok(prompts).input_ids
    assert all(tok.unk_token_id not in x for x in ids)
    assert max(len(x) for x in ids) <= tok.model_max_length


def test_split_is_disjoint_deterministic_and_covers_every_tag():
    train, test = scenes.split_records(0)
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    assert len({r["prompt"] for r in train}) == len(train) >= 300
    assert 100 <= len(test) <= 200
    assert {r["tag"] for r in test} == set(scenes.TAGS)
    assert scenes.split_records(0) == (train, test)


def test_shipped_prompt_files_match_the_generator():
    train, test = scenes.split_records(0)
    assert scenes.read_jsonl("data/shapes/train.jsonl") == train
    assert scenes.read_jsonl("data/shapes/test.jsonl") == test


def test_layout_satisfies_counts_gaps_and_relations():
    rnd = __import__("random").Random(0)
    for record in scenes.all_records()["position"][:40] + scenes.all_records()["counting"]:
        objects = scenes.layout(record, rnd)
        assert len(objects) == sum(e["count"] for e in record["include"])
        boxes = [o[2:] for o in objects]
        assert not any(scenes._overlaps(b, boxes[:i]) for i, b in enumerate(boxes))
        assert all(s / 2 <= x <= scenes.CANVAS - s / 2 and s / 2 <= y <= scenes.CANVAS - s / 2 for x, y, s in boxes)
        if record["tag"] == "position":
            relation = record["include"][1]["position"][0]
            assert scenes._relation_holds(relation, boxes[1], boxes[0])


def test_render_draws_the_requested_colours():
    record = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "blue"}], "prompt": "x"}
    image = scenes.render(record, np.random.default_rng(0))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert colours == {scenes.BACKGROUND, scenes.COLORS["blue"]}
    assert scenes.render_batch([record] * 3, np.random.default_rng(0), size=64).shape == (3, 64, 64, 3)


def test_sample_record_avoids_excluded_prompts():
    rng = np.random.default_rng(0)
    banned = [r["prompt"] for r in scenes.all_records()["single_object"][:2]]
    picks = {scenes.sample_record("single_object", rng, banned)["prompt"] for _ in range(10)}
    assert picks == {scenes.all_records()["single_object"][2]["prompt"]}
    with pytest.raises(ValueError, match="excluded"):
        scenes.sample_record("single_object", rng, [r["prompt"] for r in scenes.all_records()["single_object"]])


def test_bad_records_raise():
    with pytest.raises(ValueError, match="at most 4"):
        scenes.render({"include": [{"class": "circle", "count": 5}]}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="position target"):
        scenes.make_prompt({"include": [{"class": "circle", "count": 1, "position": ["above", 0]}]})
    with pytest.raises(ValueError, match="unknown tag"):
        scenes.sample_record("spatial", np.random.default_rng(0))


def test_summarize_uses_prompt_means():
    scores = {"shapes": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])}  # 3 prompts x 2 seeds
    out = summarize(scores, ["a", "a", "b"], n_seeds=2)
    assert out["all"]["n_prompts"] == 3
    assert out["all"]["shapes"]["mean"] == pytest.approx(0.5)
    assert out["all"]["shapes"]["se"] == pytest.approx(np.std([0.5, 1.0, 0.0], ddof=1) / np.sqrt(3))
    assert out["a"]["shapes"]["mean"] == pytest.approx(0.75)


def test_swap_colors_exchanges_the_two_colours_and_rewrites_the_prompt():
    from tpgrpo.tiny.evaluate import swap_colors

    record = {"tag": "position", "prompt": "a photo of a blue square to the left of a green triangle",
              "include": [{"class": "triangle", "count": 1, "color": "green"},
                          {"class": "square", "count": 1, "color": "blue", "position": ["left of", 0]}]}
    twin = swap_colors(record)
    assert twin["prompt"] == "a photo of a green square to the left of a blue triangle"
    assert [e["color"] for e in twin["include"]] == ["blue", "green"] and twin["include"][1]["position"] == ["left of", 0]
    assert record["include"][0]["color"] == "green"  # the original is left alone
    assert swap_colors(twin) == record
    same_class = {"tag": "color_attr", "prompt": "a photo of a red circle and a blue circle",
                  "include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "circle", "count": 1, "color": "blue"}]}
    assert swap_colors(same_class) is None
    assert swap_colors({"tag": "counting", "prompt": "a photo of two circles", "include": [{"class": "circle", "count": 2}]}) is None


def test_binding_sensitivity_scores_both_twins_against_both_records(tiny_model_dir):
    from tpgrpo.tiny.components import load_pipeline
    from tpgrpo.tiny.evaluate import binding_sensitivity

    pipe = load_pipeline(tiny_model_dir)
    pipe.set_progress_bar_config(disable=True)
    records = [r for r in scenes.read_jsonl("data/shapes/test.jsonl") if r["tag"] == "color_attr"][:3]
    result = binding_sensitivity(pipe, records, seeds=[0], steps=2)
    assert result["n_prompts"] == sum(
        len({e["class"] for e in r["include"]}) == 2 and len({e["color"] for e in r["include"]}) == 2 for r in records
    )
    assert 0 <= result["binding_own"] <= 1 and 0 <= result["binding_swapped"] <= 1 and result["pixel_change"] > 0
    with pytest.raises(ValueError, match="no record"):
        binding_sensitivity(pipe, [{"tag": "counting", "prompt": "a photo of two circles",
                                    "include": [{"class": "circle", "count": 2}]}], seeds=[0], steps=2)
