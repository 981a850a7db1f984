"""Tests for the qvlq-mini synthetic task suite (generation, writers, scoring) and qvlq.stats."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qvlq.mini.tasks import (
    BACKGROUND,
    PALETTE,
    TSV_COLUMNS,
    WORDS,
    SceneConfig,
    Task,
    format_box,
    from_qwen_box,
    generate_sample,
    generate_suite,
    iou,
    iter_suite,
    parse_boxes,
    png_bytes,
    reference_answer,
    score_answer,
    summarize,
    to_qwen_box,
    write_finetune_json,
    write_touchstone_tsv,
)
from qvlq.stats import bootstrap_ci


@pytest.fixture(scope="module")
def suite() -> list:
    return generate_suite(300, seed=3, split="eval")


# ---- determinism ----------------------------------------------------------------------------


def test_same_seed_same_samples() -> None:
    a = generate_suite(40, seed=11, split="train")
    b = generate_suite(40, seed=11, split="train")
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.task, x.question, x.answer, x.scene) == (y.id, y.task, y.question, y.answer, y.scene)
        assert png_bytes(x.image) == png_bytes(y.image)


def test_sample_does_not_depend_on_suite_size_or_render() -> None:
    short = generate_suite(5, seed=2, split="calib")
    long = generate_suite(20, seed=2, split="calib", render=False)
    for x, y in zip(short, long[:5], strict=True):
        assert y.image is None
        assert (x.question, x.answer, x.scene) == (y.question, y.answer, y.scene)
        assert x.image.tobytes() == y.load_image().tobytes()
    one = generate_sample(3, seed=2, split="calib")
    assert one.scene == short[3].scene and one.question == short[3].question
    assert [s.id for s in iter_suite(5, seed=2, split="calib")] == [s.id for s in short]


def test_splits_and_seeds_give_different_scenes() -> None:
    by_split = {sp: generate_suite(50, seed=0, split=sp) for sp in ("train", "calib", "eval")}
    for i in range(50):
        images = {png_bytes(by_split[sp][i].image) for sp in by_split}
        assert len(images) == 3
    other_seed = generate_suite(50, seed=1, split="train")
    assert all(a.scene != b.scene for a, b in zip(by_split["train"], other_seed, strict=True))
    with pytest.raises(ValueError):
        generate_suite(1, split="val")


# ---- answers agree with the pixels --------------------------------------------------------------


def test_shapes_are_drawn_where_the_metadata_says(suite: list) -> None:
    for s in suite[:120]:
        px = np.asarray(s.image)
        h, w = px.shape[:2]
        assert (w, h) == (s.scene.width, s.scene.height)
        for shape in s.scene.shapes:
            x1, y1, x2, y2 = shape.bbox
            assert 0 <= x1 < x2 < w and 0 <= y1 < y2 < h
            colour = PALETTE[shape.color]
            assert tuple(px[(y1 + y2) // 2, (x1 + x2) // 2]) == colour
            # the bbox is the tight box of that colour's pixels (colours are unique per scene)
            ys, xs = np.nonzero(np.all(px == colour, axis=-1))
            assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2), (s.id, shape)
        assert len({sh.color for sh in s.scene.shapes}) == len(s.scene.shapes)
        if s.scene.text is not None:
            x1, y1, x2, y2 = s.scene.text.bbox
            crop = px[y1 : y2 + 1, x1 : x2 + 1]
            assert crop.min() < 80  # dark ink inside the text box
        # nothing but shapes and text is drawn: outside their boxes the image is background
        other = np.ones((h, w), bool)
        boxes = [sh.bbox for sh in s.scene.shapes] + ([s.scene.text.bbox] if s.scene.text else [])
        for x1, y1, x2, y2 in boxes:
            other[y1 : y2 + 1, x1 : x2 + 1] = False
        assert np.all(px[other] == BACKGROUND)


def test_objects_do_not_overlap(suite: list) -> None:
    for s in suite:
        boxes = [sh.bbox for sh in s.scene.shapes] + ([s.scene.text.bbox] if s.scene.text else [])
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:
                touching = a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]
                assert not touching, (s.id, a, b)


def test_answers_match_scene(suite: list) -> None:
    tasks = Counter(s.task for s in suite)
    assert set(tasks) == set(Task)
    for s in suite:
        shapes = s.scene.shapes
        if s.task is Task.COLOUR:
            target = shapes[s.target]
            assert s.answer == target.color and target.kind in s.question
            assert sum(sh.kind == target.kind for sh in shapes) == 1  # unambiguous question
        elif s.task is Task.SHAPE:
            target = shapes[s.target]
            assert s.answer == target.kind and target.color in s.question
        elif s.task is Task.COUNT:
            assert s.answer == str(len(shapes)) and 1 <= len(shapes) <= 3
        elif s.task is Task.EXIST:
            present = s.query in {sh.name for sh in shapes}
            assert s.answer == ("yes" if present else "no") and s.query in s.question
        elif s.task is Task.OCR:
            assert s.scene.text is not None and s.answer == s.scene.text.text and s.answer in WORDS
        else:
            (ref, box), *rest = parse_boxes(s.answer)
            target = shapes[s.target]
            assert not rest and ref == f"the {target.name}"
            assert box == to_qwen_box(target.bbox, s.scene.width, s.scene.height)
            assert all(0 <= v < 1000 for v in box)
            assert s.answer == format_box(ref, box) and target.name in s.question
        assert score_answer(s.task, s.answer, s.answer)
        assert score_answer(s.task, reference_answer(s), s.answer), (s.task, reference_answer(s))


def test_exist_is_balanced() -> None:
    samples = generate_suite(600, seed=5, split="train", mix=[Task.EXIST], render=False)
    assert {s.task for s in samples} == {Task.EXIST}
    yes = sum(s.answer == "yes" for s in samples) / len(samples)
    assert 0.45 <= yes <= 0.55


def test_task_mix_and_config() -> None:
    samples = generate_suite(200, seed=0, split="train", mix={"ocr": 1, Task.COUNT: 3}, render=False)
    counts = Counter(s.task for s in samples)
    assert set(counts) == {Task.OCR, Task.COUNT} and counts[Task.COUNT] > 2 * counts[Task.OCR]
    cfg = SceneConfig(width=320, height=160, max_shapes=2, colors=("red", "blue", "green"))
    for s in generate_suite(30, seed=0, split="eval", config=cfg):
        assert s.image.size == (320, 160) and len(s.scene.shapes) <= 2
        assert {sh.color for sh in s.scene.shapes} <= {"red", "blue", "green"}
    with pytest.raises(ValueError):
        SceneConfig(colors=("red", "blue"), max_shapes=3)
    assert {s.task for s in generate_suite(5, mix="ocr", render=False)} == {Task.OCR}
    with pytest.raises(ValueError):
        generate_suite(1, mix={Task.OCR: 1, Task.COUNT: -1})


def test_qwen_box_convention() -> None:
    assert to_qwen_box((0, 0, 223, 111), 224, 112) == (0, 0, 995, 991)
    assert from_qwen_box((500, 250, 999, 999), 224, 112) == (112, 28, 223, 111)


# ---- writers --------------------------------------------------------------------------------


def test_finetune_json(tmp_path: Path, suite: list) -> None:
    samples = suite[:12]
    path = write_finetune_json(samples, tmp_path / "data", "mini_train")
    assert path == tmp_path / "data" / "mini_train.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    assert len(records) == 12
    for rec, s in zip(records, samples, strict=True):
        assert rec["id"] == s.id
        user, assistant = rec["conversations"]
        assert user["from"] == "user" and assistant == {"from": "assistant", "value": s.answer}
        head, question = user["value"].split("\n", 1)
        assert head.startswith("Picture 1: <img>") and head.endswith("</img>") and question == s.question
        rel = head[len("Picture 1: <img>") : -len("</img>")]
        assert not Path(rel).is_absolute()
        with Image.open(path.parent / rel) as img:
            assert img.convert("RGB").tobytes() == s.image.tobytes()
    assert not list((tmp_path / "data").glob(".*tmp"))  # no temp files left behind
    with pytest.raises(ValueError):
        write_finetune_json([samples[0], samples[0]], tmp_path / "dup")


def test_touchstone_tsv_round_trip(tmp_path: Path, suite: list) -> None:
    samples = suite[:24]
    path = write_touchstone_tsv(samples, tmp_path / "mini.tsv")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert tuple(reader.fieldnames) == TSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(samples)
    for i, (row, s) in enumerate(zip(rows, samples, strict=True)):
        assert row["index"] == str(i) and row["question"] == s.question
        with Image.open(io.BytesIO(base64.b64decode(row["image"]))) as img:
            assert img.format == "PNG" and img.convert("RGB").tobytes() == s.image.tobytes()
        assert all(sh.name in row["human_annotation"] for sh in s.scene.shapes)
        assert row["category"] and all(c.strip() for c in row["category"].split(","))
        assert row["task_name"] and row["gpt4_ha_answer"]
    assert any("," in r["category"] for r in rows)

    pd = pytest.importorskip("pandas")
    df = pd.read_csv(path, sep="\t")
    assert list(df.columns) == list(TSV_COLUMNS) and len(df) == len(samples)
    assert df["question"].tolist() == [s.question for s in samples]


# ---- scoring --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "prediction", "reference", "expected"),
    [
        ("colour", "Red.", "red", True),
        ("colour", "  RED  ", "red", True),
        ("colour", "The circle is red.", "red", True),
        ("colour", "red or blue", "red", False),
        ("colour", "reddish", "red", False),
        ("shape", "a circle", "circle", True),
        ("shape", "The red object is a circle.", "circle", True),
        ("shape", "square", "circle", False),
        ("count", "2", "2", True),
        ("count", "two", "2", True),
        ("count", "Two.", "2", True),
        ("count", "There are 2 shapes.", "2", True),
        ("count", "3", "2", False),
        ("count", "2 or 3", "2", False),
        ("exist", "Yes", "yes", True),
        ("exist", "no.", "yes", False),
        ("exist", "Yes, there is no square", "yes", True),
        ("exist", "No, there is no blue square.", "no", True),
        ("exist", "", "no", False),
        ("ocr", "cat", "CAT", True),
        ("ocr", 'The text says "CAT".', "CAT", True),
        ("ocr", "CATS", "CAT", False),
        ("ocr", "C A T", "CAT", False),
        (
            "ground",
            "<ref>the red circle</ref><box>(100,100),(300,300)</box>",
            "<box>(100,100),(300,300)</box>",
            True,
        ),
        ("ground", "<box>(110,120),(310,290)</box>", "<ref>x</ref><box>(100,100),(300,300)</box>", True),
        ("ground", "<box>(200,200),(400,400)</box>", "<box>(100,100),(300,300)</box>", False),
        ("ground", "the red circle", "<box>(100,100),(300,300)</box>", False),
    ],
)
def test_score_answer(task: str, prediction: str, reference: str, expected: bool) -> None:
    assert score_answer(task, prediction, reference) is expected


def test_score_answer_strict_and_errors() -> None:
    assert score_answer(Task.COUNT, "two", "2", strict=True)
    assert not score_answer(Task.COUNT, "There are 2 shapes.", "2", strict=True)
    assert not score_answer(Task.COLOUR, "The circle is red.", "red", strict=True)
    assert score_answer(Task.COLOUR, "the red", "red", strict=True)
    with pytest.raises(ValueError):
        score_answer(Task.GROUND, "<box>(1,1),(2,2)</box>", "no box here")
    with pytest.raises(ValueError):
        score_answer("colour", "red", "")
    with pytest.raises(ValueError):
        score_answer("nonsense", "red", "red")


def test_parse_boxes() -> None:
    text = (
        "<ref>a dog</ref><box>(1,2),(3,4)</box><box>( 5 , 6 ) , ( 7 , 8 )</box> and "
        "<box>(9.4,10.6),(11,12)</box><ref>cat</ref><box>(0,0),(999,999)</box>"
    )
    assert parse_boxes(text) == [
        ("a dog", (1, 2, 3, 4)),
        ("a dog", (5, 6, 7, 8)),
        ("a dog", (9, 11, 11, 12)),
        ("cat", (0, 0, 999, 999)),
    ]
    assert parse_boxes("<box>(1,2),(3,4)</box>")[0].ref is None
    assert parse_boxes("no boxes <box>(1,2)</box> <box>(1,2),(3,</box>") == []
    assert parse_boxes("") == []


def test_iou() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 10, 20, 20)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((10, 10, 0, 0), (0, 0, 10, 10)) == 1.0  # corners in either order
    assert iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert iou((5, 5, 5, 5), (5, 5, 5, 5)) == 1.0
    assert iou((5, 5, 5, 5), (0, 0, 0, 0)) == 0.0


# ---- statistics -----------------------------------------------------------------------------


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(1)
    values = rng.random(200) < 0.7
    low, high = bootstrap_ci(values)
    assert low < values.mean() < high and 0.5 < low and high < 0.9
    assert bootstrap_ci(values) == (low, high)  # seeded: identical
    assert bootstrap_ci(values, seed=1) != (low, high)
    narrow = bootstrap_ci(values, alpha=0.5)
    assert low < narrow[0] <= narrow[1] < high
    # any statistic, including ones without an ``axis`` argument, and paired rows
    med = bootstrap_ci(rng.normal(size=101), stat=lambda x: float(np.median(x)))
    assert med[0] < 0 < med[1]
    pairs = np.stack([rng.normal(size=80), rng.normal(size=80) + 1.0], axis=1)
    diff = bootstrap_ci(pairs, stat=lambda p: float(np.mean(p[:, 1] - p[:, 0])))
    assert 0 < diff[0] < 1 < diff[1]
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_summarize() -> None:
    results = [(Task.COLOUR, True)] * 30 + [("colour", False)] * 10 + [(Task.OCR, True)] * 5
    table = summarize(results)
    assert list(table) == ["colour", "ocr", "all"]
    acc, low, high, n = table["colour"]
    assert (acc, n) == (0.75, 40) and low < acc < high
    assert table["ocr"] == (1.0, 1.0, 1.0, 5)
    assert table["all"].n == 45 and table["all"].accuracy == pytest.approx(35 / 45)
    assert summarize(results) == table
    assert summarize([]) == {}
