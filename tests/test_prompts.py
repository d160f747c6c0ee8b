"""The prompt-set generators: GenEval's record format and tags, determinism, disjoint splits."""
import json
from collections import Counter

import pytest

from tpgrpo.prompts import geneval_candidates, geneval_prompts, main, ocr_prompts, plural
from tpgrpo.rewards.geneval import TAGS, validate_record
from tpgrpo.rewards.geneval_detector import GENEVAL_OBJECTS, validate_geneval_record
from tpgrpo.rewards.ocr import quoted_text


def test_plurals():
    assert [plural(n) for n in ("cup", "bus", "bench", "person", "wine glass", "teddy bear", "knife")] == [
        "cups", "buses", "benches", "people", "wine glasses", "teddy bears", "knives"]


def test_geneval_records_per_tag_have_genevals_structure():
    train, test = geneval_prompts(train_per_tag=30, test_per_tag=10, seed=0)
    assert Counter(r["tag"] for r in test) == {tag: 10 for tag in TAGS}
    assert Counter(r["tag"] for r in train) == {tag: 30 for tag in TAGS}
    for record in train + test:
        validate_record(record)
        validate_geneval_record(record)
        include = record["include"]
        assert all(clause["class"] in GENEVAL_OBJECTS for clause in include)
        if record["tag"] == "counting":
            (clause,) = include
            assert 2 <= clause["count"] <= 4
            assert record["exclude"] == [{"class": clause["class"], "count": clause["count"] + 1}]
        elif record["tag"] == "position":
            assert [len(include), include[1]["position"][1]] == [2, 0]  # relative to the earlier clause
            assert include[1]["position"][0] in ("left of", "right of", "above", "below")
            assert include[0]["class"] != include[1]["class"]
        elif record["tag"] in ("colors", "color_attr"):
            assert all("color" in clause for clause in include)
            assert len(include) == (1 if record["tag"] == "colors" else 2)
        else:
            assert len(include) == (1 if record["tag"] == "single_object" else 2)


def test_geneval_prompts_read_as_genevals():
    first = {tag: next(geneval_candidates(tag)) for tag in TAGS}
    assert first["single_object"]["prompt"] == "a photo of a person"
    assert first["counting"]["prompt"] == "a photo of two people"
    assert first["colors"]["prompt"] == "a photo of a red bicycle"  # GenEval colours no person
    assert first["position"]["prompt"] == "a photo of a person left of a bicycle"
    assert first["two_object"]["prompt"] == "a photo of a person and a bicycle"
    assert first["color_attr"]["prompt"] == "a photo of a red bicycle and an orange car"
    for tag in ("colors", "color_attr"):
        records = list(geneval_candidates(tag))
        assert all(clause["class"] != "person" for r in records for clause in r["include"])
        assert {clause["class"] for r in records for clause in r["include"]} == set(GENEVAL_OBJECTS) - {"person"}
    # every tag's full candidate count: 80 objects (79 colourable), 10 colours, 4 relations, counts 2-4
    assert [sum(1 for _ in geneval_candidates(tag)) for tag in TAGS] == [
        80, 80 * 79 // 2, 80 * 3, 79 * 10, 80 * 79 * 4, 79 * 78 * 10 * 9]


def test_geneval_split_is_deterministic_disjoint_and_seeded():
    train, test = geneval_prompts(40, 20, seed=0)
    assert (train, test) == geneval_prompts(40, 20, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in train + test}) == len(train) + len(test)
    assert geneval_prompts(40, 20, seed=1)[1] != test


def test_ocr_prompts_quote_held_out_text():
    train, test = ocr_prompts(300, 50, seed=0)
    assert (len(train), len(test)) == (300, 50) and (train, test) == ocr_prompts(300, 50, seed=0)
    train_texts, test_texts = {quoted_text(p) for p in train}, {quoted_text(p) for p in test}
    assert all(train_texts) and all(test_texts) and not train_texts & test_texts
    assert ocr_prompts(300, 50, seed=1) != (train, test)


def test_command_line_writes_the_files(tmp_path, capsys):
    main(["geneval", "--out", str(tmp_path / "g"), "--train-per-tag", "5", "--test-per-tag", "2"])
    records = [json.loads(line) for line in (tmp_path / "g" / "train.jsonl").read_text().splitlines()]
    assert len(records) == 30 and len((tmp_path / "g" / "test.jsonl").read_text().splitlines()) == 12
    main(["ocr", "--out", str(tmp_path / "o"), "--train", "7", "--test", "3"])
    assert len((tmp_path / "o" / "train.txt").read_text().splitlines()) == 7
    assert "wrote 7 training and 3 test prompts (ocr)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["coco", "--out", str(tmp_path)])


def test_shipped_prompt_files_are_the_default_command(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    main(["geneval", "--out", str(tmp_path / "geneval")])
    main(["ocr", "--out", str(tmp_path / "ocr")])
    for name in ("geneval/train.jsonl", "geneval/test.jsonl", "ocr/train.txt", "ocr/test.txt"):
        assert (tmp_path / name).read_text() == (root / "data" / name).read_text(), name
