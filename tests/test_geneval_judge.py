"""GenEval's rules (`tpgrpo.rewards.geneval.judge`) on hand-made detections, values worked by hand."""
import dataclasses
import random

import pytest

from tpgrpo.rewards.geneval import RELATIONS, TAGS, Judgement, judge, relations


def det(x0, y0, x1, y1, color=None):
    return {"box": [x0, y0, x1, y1], "color": color}


def square(cx, cy, color=None, size=10):
    """A detection: a size x size box centred on (cx, cy)."""
    return det(cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2, color)


def record(tag, include, exclude=None):
    out = {"tag": tag, "include": include, "prompt": "a photo"}
    if exclude is not None:
        out["exclude"] = exclude
    return out


# ---------------------------------------------------------------------------------------------
# relations


def test_relations_axis_and_sign():
    a, b = [0, 0, 10, 10], [20, 0, 30, 10]
    # offset (-20, 0), shrink 0.1 * 20 = 2 on each axis -> (-18, 0) / 20 -> dx = -0.9
    assert relations(a, b) == {"left of"}
    assert relations(b, a) == {"right of"}
    up, down = [0, 0, 10, 10], [0, 30, 10, 40]  # y grows downwards
    assert relations(up, down) == {"above"}
    assert relations(down, up) == {"below"}


@pytest.mark.parametrize("d, expected", [(4.01, {"left of"}), (3.99, set()), (2.0, set())])
def test_relations_at_the_half_bound(d, expected):
    # A left of B by d on x, equal 10x10 boxes: shrink 2, dx = -(d - 2) / d, left when d > 4
    a, b = [0, 0, 10, 10], [d, 0, 10 + d, 10]
    assert relations(a, b) == expected


def test_relations_threshold_scales_with_summed_sizes():
    a, b = [0, 0, 10, 10], [8, 0, 18, 10]  # offset -8, summed width 20
    assert relations(a, b, 0.1) == {"left of"}  # (8 - 2) / 8 = 0.75
    assert relations(a, b, 0.3) == set()  # (8 - 6) / 8 = 0.25
    wide = [0, 0, 40, 10]  # centre 20; B centre 55, summed width 50: (35 - 5) / 35 > 0.5
    assert relations(wide, [50, 0, 60, 10]) == {"left of"}
    assert relations(wide, [50, 0, 60, 10], 0.4) == set()  # (35 - 20) / 35 = 0.43


def test_relations_none_when_both_shrunk_components_are_tiny():
    a = [0, 0, 10, 10]
    # threshold 0: the shrunk offset is the offset; under 1e-3 on both axes means no relation,
    # although its direction is exactly along x
    assert relations([0.0005, 0, 10.0005, 10], a, 0.0) == set()
    assert relations([0.002, 0, 10.002, 10], a, 0.0) == {"right of"}
    # with the default threshold, an offset within the shrink on both axes: nothing
    assert relations([1.9, 1.9, 11.9, 11.9], a) == set()
    assert relations(a, a) == set()


def test_relations_diagonal_gives_two():
    a, b = [0, 0, 10, 10], [20, 20, 30, 30]
    # offset (-20, -20): shrunk (-18, -18) / 28.28 = -0.64 on both axes
    assert relations(a, b) == {"left of", "above"}
    assert relations(b, a) == {"right of", "below"}
    # a shallow diagonal keeps only the main axis: (-18, -8) / 22.4 = (-0.80, -0.36)
    assert relations(a, [20, 10, 30, 20]) == {"left of"}


def test_relations_uses_the_unshrunk_length():
    # offset (-30, 10): shrunk (-28, 8); divided by |(-30, 10)| = 31.62 -> (-0.885, 0.253)
    assert relations([0, 10, 10, 20], [30, 0, 40, 10]) == {"left of"}
    # (-12, 9): shrunk (-10, 7) / 15 = (-0.667, 0.467): below needs > 0.5
    assert relations([0, 9, 10, 19], [12, 0, 22, 10]) == {"left of"}
    # (-12, 10): shrunk (-10, 8) / 15.62 = (-0.640, 0.512): both
    assert relations([0, 10, 10, 20], [12, 0, 22, 10]) == {"left of", "below"}


# ---------------------------------------------------------------------------------------------
# one test group per GenEval tag

DOG = {"class": "dog", "count": 1}


def test_single_object():
    r = record("single_object", [DOG])
    ok = judge(r, {"dog": [square(50, 50)]})
    assert ok == Judgement(correct=True, strict=True, score=1.0, reasons=[])
    missing = judge(r, {"cat": [square(50, 50)]})  # the class is absent from objects
    assert (missing.correct, missing.strict, missing.score) == (False, False, 0.0)
    assert missing.reasons == [
        "correct: include[0] (1 dog): 0 dog detected, needs at least 1",
        "strict: include[0] (1 dog): 0 dog detected, needs exactly 1",
    ]
    assert judge(r, {"dog": []}) == missing
    over = judge(r, {"dog": [square(20, 20), square(80, 80)]})
    # GenEval takes the most confident dog and is satisfied; exact count fails; 1 - |1 - 2| / 1 = 0
    assert (over.correct, over.strict, over.score) == (True, False, 0.0)
    assert over.reasons == ["strict: include[0] (1 dog): 2 dog detected, needs exactly 1"]
    # far over: the count term is clamped at 0 (1 - |1 - 3| / 1 = -1 otherwise)
    assert judge(r, {"dog": [square(10 * k, 10) for k in range(3)]}).score == 0.0


def test_two_object():
    r = record("two_object", [DOG, {"class": "cat", "count": 1}])
    both = judge(r, {"dog": [square(20, 20)], "cat": [square(80, 80)], "car": [square(50, 50)]})
    assert (both.correct, both.strict, both.score) == (True, True, 1.0)  # other classes are ignored
    one = judge(r, {"dog": [square(20, 20)]})
    assert (one.correct, one.strict, one.score) == (False, False, 0.5)
    assert one.reasons == [
        "correct: include[1] (1 cat): 0 cat detected, needs at least 1",
        "strict: include[1] (1 cat): 0 cat detected, needs exactly 1",
    ]


def test_counting_with_exclude():
    r = record("counting", [{"class": "cat", "count": 3}], [{"class": "cat", "count": 4}])
    cats = [square(10 + 20 * k, 50) for k in range(5)]
    exact = judge(r, {"cat": cats[:3]})
    assert (exact.correct, exact.strict, exact.score, exact.reasons) == (True, True, 1.0, [])
    few = judge(r, {"cat": cats[:2]})
    assert (few.correct, few.strict) == (False, False) and few.score == pytest.approx(1 - 1 / 3)
    many = judge(r, {"cat": cats[:4]})
    # the include clause holds on the first 3, but 4 cats reach the exclude clause's count
    assert (many.correct, many.strict) == (False, False) and many.score == pytest.approx(1 - 1 / 3)
    assert "correct: exclude[0]: 4 cat detected, must be fewer than 4" in many.reasons
    assert "strict: include[0] (3 cat): 4 cat detected, needs exactly 3" in many.reasons
    assert judge(r, {"cat": cats}).score == pytest.approx(1 - 2 / 3)  # exclusions stay out of it


def test_over_count_without_exclude_is_correct_not_strict():
    r = record("counting", [{"class": "cat", "count": 2}])
    out = judge(r, {"cat": [square(10, 10), square(40, 10), square(70, 10)]})
    assert (out.correct, out.strict, out.score) == (True, False, 0.5)  # 1 - |2 - 3| / 2


def test_exclude_of_another_class_and_with_a_colour():
    r = record("single_object", [DOG], [{"class": "cat", "count": 1}])
    assert judge(r, {"dog": [square(20, 20)]}).strict
    with_cat = judge(r, {"dog": [square(20, 20)], "cat": [square(80, 80)]})
    assert (with_cat.correct, with_cat.strict, with_cat.score) == (False, False, 1.0)
    assert with_cat.reasons == [
        "correct: exclude[0]: 1 cat detected, must be fewer than 1",
        "strict: exclude[0]: 1 cat detected, must be fewer than 1",
    ]
    # an exclude clause with a colour (the shapes world's) counts only that colour
    reds = record(
        "counting", [{"class": "circle", "count": 2, "color": "red"}],
        [{"class": "circle", "count": 3, "color": "red"}],
    )
    circles = [square(10, 10, "red"), square(40, 10, "red"), square(70, 10, "blue")]
    out = judge(reds, {"circle": circles})
    assert (out.correct, out.strict) == (True, False)
    assert out.score == 0.25  # count term 1 - |2 - 3| / 2 = 0.5, colour term 0 (n != count)
    out3 = judge(reds, {"circle": circles[:2] + [square(70, 10, "red")]})
    assert not out3.correct and "correct: exclude[0]: 3 red circle detected, must be fewer than 3" in out3.reasons


def test_colors():
    r = record("colors", [{"class": "car", "count": 1, "color": "red"}])
    assert judge(r, {"car": [square(50, 50, "red")]}).score == 1.0
    blue = judge(r, {"car": [square(50, 50, "blue")]})
    assert (blue.correct, blue.strict, blue.score) == (False, False, 0.5)  # count 1, colour 0
    assert blue.reasons == [
        "correct: include[0] (1 red car): 1 of the 1 car taken are not red (blue)",
        "strict: include[0] (1 red car): 1 of the 1 car taken are not red (blue)",
    ]
    unknown = judge(r, {"car": [square(50, 50, None)]})  # colour None matches no colour
    assert (unknown.correct, unknown.score) == (False, 0.5)
    assert judge(r, {"car": [{"box": [0, 0, 9, 9]}]}).score == 0.5  # no colour key: None
    # only the most confident car is checked by GenEval; strict checks both and the count
    first_red = judge(r, {"car": [square(20, 20, "red"), square(80, 80, "blue")]})
    assert (first_red.correct, first_red.strict, first_red.score) == (True, False, 0.0)
    first_blue = judge(r, {"car": [square(20, 20, "blue"), square(80, 80, "red")]})
    assert (first_blue.correct, first_blue.strict) == (False, False)


def test_counting_with_a_colour_gets_colour_partial_credit():
    r = record("counting", [{"class": "car", "count": 2, "color": "red"}])
    half = judge(r, {"car": [square(20, 20, "red"), square(80, 80, "blue")]})
    # count 1, colour 1 - |2 - 1| / 2 = 0.5 -> mean 0.75
    assert (half.correct, half.strict, half.score) == (False, False, 0.75)
    three = judge(r, {"car": [square(20, 20, "red"), square(50, 50, "red"), square(80, 80, "red")]})
    assert (three.correct, three.strict, three.score) == (True, False, 0.25)  # count 0.5, colour 0


POSITION = record("position", [DOG, {"class": "cat", "count": 1, "position": ["left of", 0]}])


def test_position():
    ok = judge(POSITION, {"dog": [square(80, 50)], "cat": [square(20, 50)]})
    assert (ok.correct, ok.strict, ok.score, ok.reasons) == (True, True, 1.0, [])
    wrong = judge(POSITION, {"dog": [square(20, 50)], "cat": [square(80, 50)]})
    assert (wrong.correct, wrong.strict) == (False, False) and wrong.score == pytest.approx(2 / 3)
    assert wrong.reasons[0] == "correct: include[1] (1 cat): 1 of 1 (cat, include[0]) pairs are not 'left of'"
    no_dog = judge(POSITION, {"cat": [square(20, 50)]})
    # dog 0, cat count 1, position 0
    assert (no_dog.correct, no_dog.score) == (False, pytest.approx(1 / 3))
    assert "correct: include[1] (1 cat): its position target include[0] does not hold" in no_dog.reasons
    diagonal = record("position", [DOG, {"class": "cat", "count": 1, "position": ["above", 0]}])
    assert judge(diagonal, {"dog": [square(80, 80)], "cat": [square(20, 20)]}).strict  # above and left


def test_position_extra_objects_and_strict_targets():
    # a second, less confident cat on the wrong side: GenEval ignores it, strict does not
    extra_cat = judge(POSITION, {"dog": [square(50, 50)], "cat": [square(20, 50), square(80, 50)]})
    assert (extra_cat.correct, extra_cat.strict) == (True, False)
    assert extra_cat.score == pytest.approx(1 / 3)  # dog 1, cat count 0, position 0
    # a second dog left of the cat: GenEval's target is the first dog only; strict's target fails
    extra_dog = judge(POSITION, {"dog": [square(80, 50), square(5, 50)], "cat": [square(40, 50)]})
    assert (extra_dog.correct, extra_dog.strict) == (True, False)
    assert "strict: include[1] (1 cat): its position target include[0] does not hold" in extra_dog.reasons
    assert extra_dog.score == pytest.approx(1 / 3)  # dog 0, cat count 1, position 0
    # every taken object against every target object: a cat between two dogs fails
    two_dogs = record("position", [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["left of", 0]}])
    between = judge(two_dogs, {"dog": [square(80, 50), square(5, 50)], "cat": [square(40, 50)]})
    assert (between.correct, between.strict, between.score) == (False, False, pytest.approx(2 / 3))
    assert between.reasons[0] == "correct: include[1] (1 cat): 1 of 2 (cat, include[0]) pairs are not 'left of'"
    left_of_both = judge(two_dogs, {"dog": [square(80, 50), square(60, 80)], "cat": [square(20, 50)]})
    assert left_of_both.strict


def test_position_threshold_is_passed_through():
    objects = {"dog": [det(8, 0, 18, 10)], "cat": [det(0, 0, 10, 10)]}  # cat 8 px left, summed width 20
    assert judge(POSITION, objects).strict
    assert not judge(POSITION, objects, position_threshold=0.3).correct


def test_color_attr():
    r = record("color_attr", [{"class": "car", "count": 1, "color": "red"}, {"class": "bus", "count": 1, "color": "blue"}])
    assert judge(r, {"car": [square(20, 20, "red")], "bus": [square(80, 80, "blue")]}).strict
    swapped = judge(r, {"car": [square(20, 20, "blue")], "bus": [square(80, 80, "red")]})
    assert (swapped.correct, swapped.strict, swapped.score) == (False, False, 0.5)  # (1 + 0 + 1 + 0) / 4
    assert len([x for x in swapped.reasons if x.startswith("correct: ")]) == 2


def test_position_with_colours_scores_all_terms():
    r = record("position", [
        {"class": "car", "count": 1, "color": "green"},
        {"class": "bus", "count": 1, "color": "blue", "position": ["below", 0]},
    ])
    objects = {"car": [square(50, 20, "green")], "bus": [square(50, 80, "red")]}
    out = judge(r, objects)  # car count 1, colour 1; bus count 1, colour 0, position 0 (not strict)
    assert (out.correct, out.score) == (False, pytest.approx(3 / 5))
    objects["bus"][0]["color"] = "blue"
    assert judge(r, objects).score == 1.0


# ---------------------------------------------------------------------------------------------
# invariants, records and inputs


def test_invariants_on_random_detections():
    rnd = random.Random(0)
    colors = ["red", "blue", None]
    records = [
        record("counting", [{"class": "cat", "count": 2, "color": "red"}]),
        record("position", [{"class": "dog", "count": 1}, {"class": "cat", "count": 2, "position": ["right of", 0]}]),
        record("color_attr", [{"class": "dog", "count": 1, "color": "blue"}, {"class": "cat", "count": 1, "color": "red"}]),
    ]
    for _ in range(300):
        objects = {
            name: [square(rnd.uniform(0, 100), rnd.uniform(0, 100), rnd.choice(colors)) for _ in range(rnd.randint(0, 3))]
            for name in ("dog", "cat")
        }
        for r in records:
            out = judge(r, objects)
            assert 0.0 <= out.score <= 1.0
            assert out.correct or not out.strict  # strict implies correct
            assert (out.reasons == []) == out.strict
            assert out.strict == (out.score == 1.0)  # no exclude clauses: full score iff strict
            assert out.correct == (not any(x.startswith("correct: ") for x in out.reasons))


def test_judgement_is_frozen_and_tags_are_free():
    out = judge(record("single_object", [DOG]), {"dog": [square(5, 5)]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.correct = False
    assert judge({"include": [DOG]}, {"dog": [square(5, 5)]}).strict  # no tag
    assert judge(record("my_own_tag", [DOG]), {"dog": [square(5, 5)]}).strict
    assert set(TAGS) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert set(RELATIONS) == {"left of", "right of", "above", "below"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "a photo of a cat"}, "no 'include' clauses"),
        (record("single_object", []), "no 'include' clauses"),
        ("a photo of a cat", "must be a mapping"),
        (record("counting", [{"class": "cat", "count": 0}]), r"include\[0\] 'count' must be an integer >= 1, got 0"),
        (record("counting", [{"class": "cat", "count": "2"}]), "'count' must be an integer"),
        (record("counting", [{"class": "cat", "count": True}]), "'count' must be an integer"),
        (record("counting", [{"class": "cat"}]), r"include\[0\] 'count'"),
        (record("single_object", [{"count": 1}]), r"include\[0\] needs a 'class'"),
        (record("colors", [{"class": "cat", "count": 1, "color": 3}]), "'color' must be a colour name"),
        (record("position", [DOG, {"class": "cat", "count": 1, "position": ["near", 0]}]), "unknown relation 'near'"),
        (record("position", [DOG, {"class": "cat", "count": 1, "position": ["above", 1]}]), "target 1 is not an earlier"),
        (record("position", [{**DOG, "position": ["above", 1]}, {"class": "cat", "count": 1}]), "target 1 is not an earlier"),
        (record("position", [DOG, {"class": "cat", "count": 1, "position": ["above", -1]}]), "target -1 is not an earlier"),
        (record("position", [DOG, {"class": "cat", "count": 1, "position": "above"}]), r"must be \[relation, index\]"),
        (record("counting", [DOG], [{"class": "dog", "count": 0}]), r"exclude\[0\] 'count'"),
        (record("counting", [DOG], {"class": "dog", "count": 2}), "'exclude' must be a list"),
        ({"tag": 5, "include": [DOG]}, "'tag' must be a string"),
    ],
)
def test_invalid_records_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        judge(bad, {})


@pytest.mark.parametrize(
    "objects, message",
    [
        ([("dog", [0, 0, 1, 1])], "objects must map class names"),
        ({"dog": {"box": [0, 0, 1, 1]}}, r"objects\['dog'\] must be a list"),
        ({"dog": [{"box": [0, 0, 1]}]}, r"objects\['dog'\]\[0\] needs a 'box'"),
        ({"dog": [{"box": [5, 0, 1, 1]}]}, "x0 <= x1"),
        ({"dog": [{"color": "red"}]}, "needs a 'box'"),
    ],
)
def test_invalid_objects_raise(objects, message):
    with pytest.raises(ValueError, match=message):
        judge(record("single_object", [DOG]), objects)
