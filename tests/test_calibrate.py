"""Calibration data: sources, ChatML rendering, span-safe truncation, bad rows, bundles, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import qvlq
from qvlq.calibrate import (
    SKIP_REASONS,
    CalibrationError,
    build_bundle,
    image_spans,
    is_bundle,
    load_bundle,
    load_calibration,
    safe_cut,
    save_bundle,
)
from qvlq.chat import DEFAULT_SYSTEM, make_context, render_conversation
from qvlq.checkpoint import preset_config, write_model_files
from qvlq.cli import app
from qvlq.image import load_image, preprocess
from qvlq.mini.tasks import generate_suite, png_bytes, write_finetune_json
from qvlq.tokenizer import QWenTokenizer


@pytest.fixture(scope="module")
def tok() -> QWenTokenizer:
    return QWenTokenizer(Path(qvlq.__file__).parent / "assets" / "qwen.tiktoken")


@pytest.fixture(scope="module")
def cfg():
    return preset_config("tiny")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cfg) -> Path:
    d = tmp_path_factory.mktemp("model")
    write_model_files(d, cfg, torch.bfloat16)
    return d


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """Finetune JSON (relative image paths) of 6 synthetic samples."""
    return write_finetune_json(generate_suite(6, seed=0, split="calib"), tmp_path_factory.mktemp("suite"))


def by_hand(tok: QWenTokenizer, turns: list[tuple[str, str]], system: str = DEFAULT_SYSTEM) -> list[int]:
    """spec §6: <|im_start|>role\\ncontent<|im_end|>, role / "\\n" / content tokenized separately."""
    nl = tok.encode_text("\n")

    def turn(role: str, content: str) -> list[int]:
        return [tok.im_start_id] + tok.encode_text(role) + nl + tok.encode_text(content) + [tok.im_end_id]

    ids = turn("system", system)
    for q, a in turns:
        ids += nl + turn("user", q) + nl + turn("assistant", a)
    return ids


def check_spans(sample, tok: QWenTokenizer, cfg) -> None:
    ids = sample.input_ids.tolist()
    spans = image_spans(ids, tok)
    assert ids.count(tok.img_start_id) == ids.count(tok.img_end_id) == len(spans) == sample.n_images
    for a, e in spans:
        assert e - a - 1 == cfg.n_queries
        assert all(t < 256 or t == tok.img_pad_id for t in ids[a + 1 : e]) and ids[e - 1] == tok.img_pad_id
    if sample.pixels is not None:
        assert tuple(sample.pixels.shape) == (len(spans), 3, 448, 448) and sample.pixels.dtype == torch.float32


def write_rows(path: Path, rows: list, jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


# --------------------------------------------------------------------------------------------------


def test_finetune_json_round_trip(tmp_path, tok, cfg, suite) -> None:
    calib = build_bundle(suite, tok, cfg, num_samples=6)
    st = calib.stats
    assert (st.samples, st.images, st.rows_total, st.format, st.skipped) == (6, 6, 6, "json", {})
    assert st.image_tokens == 6 * 258 and st.total_tokens == sum(s.n_tokens for s in calib)
    assert list(st.source_sha256) == ["train.json"] and len(st.source_sha256["train.json"]) == 64
    rows = json.loads(suite.read_text())
    for s in calib:
        check_spans(s, tok, cfg)
        row = rows[s.index]
        assert s.id == row["id"] and s.sources == [f"images/{row['id']}.png"]
        turns = [(row["conversations"][0]["value"], row["conversations"][1]["value"])]
        assert s.input_ids.tolist() == by_hand(tok, turns)
        want = preprocess(load_image(suite.parent / s.sources[0]), 448)
        assert torch.equal(s.pixels[0], want)
    out = save_bundle(calib, tmp_path / "bundle")
    assert is_bundle(out) and sorted(p.name for p in out.iterdir()) == ["calibration.json", "calibration.safetensors"]
    back = load_bundle(out, expect_config=cfg, expect_tokenizer=tok)
    assert back.stats == st and [s.id for s in back] == [s.id for s in calib]
    for a, b in zip(calib, back, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixels, b.pixels)
        assert (a.sources, a.index, a.truncated) == (b.sources, b.index, b.truncated)
    meta = json.loads((out / "calibration.json").read_text())
    assert meta["format"] == "qvlq-calibration" and meta["version"] == 1 and meta["pixel_dtype"] == "float32"
    assert meta["model"]["n_queries"] == 256 and meta["model"]["image_size"] == 448
    assert load_calibration(out, tok, cfg).stats == st  # a bundle is loaded, not rebuilt
    with pytest.raises(FileExistsError):
        save_bundle(calib, out)
    save_bundle(calib, out, overwrite=True, pixel_dtype="fp16")
    assert load_bundle(out).samples[0].pixels.dtype == torch.float16


def test_multiturn_token_exact_with_make_context(tmp_path, tok, cfg, suite) -> None:
    rel = "images/" + json.loads(suite.read_text())[0]["id"] + ".png"
    q1 = f"Picture 1: <img>{rel}</img>\nWhat is this?"
    a1 = "A <ref>red square</ref><box>(10,20),(300,400)</box>."
    q2, a2 = "And the colour\nof it?", "Red — 红色."
    row = {"id": "mt", "conversations": [
        {"from": "human", "value": q1}, {"from": "gpt", "value": a1},
        {"from": "User", "value": q2}, {"from": "assistant", "value": a2},
    ]}  # fmt: skip
    data = write_rows(suite.parent / "multiturn.json", [row])
    s = build_bundle(data, tok, cfg).samples[0]
    ids = s.input_ids.tolist()
    assert ids == by_hand(tok, [(q1, a1), (q2, a2)])
    prompt = make_context(tok, q2, [(q1, a1)])[1]
    assert ids == prompt + tok.encode_text(a2) + [tok.im_end_id]
    raw, rendered = render_conversation(tok, [(q1, a1), (q2, a2)])
    assert rendered == ids and raw.endswith(f"{a2}<|im_end|>") and tok.box_start_id in ids
    check_spans(s, tok, cfg)
    # a leading system turn replaces the default system prompt
    row["conversations"].insert(0, {"from": "system", "value": "Be brief."})
    data = write_rows(suite.parent / "multiturn_sys.json", [row])
    assert build_bundle(data, tok, cfg).samples[0].input_ids.tolist() == by_hand(tok, [(q1, a1), (q2, a2)], "Be brief.")


def test_truncation_never_splits_a_span(tmp_path, tok, cfg, suite) -> None:
    ids_ = [r["id"] for r in json.loads(suite.read_text())]
    q = f"Picture 1: <img>images/{ids_[0]}.png</img>\nPicture 2: <img>images/{ids_[1]}.png</img>\nCompare them."
    turns = [(q, "They differ in colour and shape.")]
    full = by_hand(tok, turns)
    spans = image_spans(full, tok)
    assert len(spans) == 2
    for max_len in range(1, len(full) + 3):  # exhaustive on the cut rule
        cut = safe_cut(full, spans, max_len)
        assert cut <= max_len and cut <= len(full)
        assert all(e < cut or a >= cut for a, e in spans)  # every span entirely kept or entirely dropped
        assert cut == min(max_len, len(full)) or any(a == cut and a < max_len <= e for a, e in spans)
    data = write_rows(tmp_path / "two.json", [{"id": "two", "conversations": [
        {"from": "user", "value": q}, {"from": "assistant", "value": turns[0][1]}]}])  # fmt: skip
    data_images = suite.parent / "images"
    shutil.copytree(data_images, tmp_path / "images")
    (a1, e1), (a2, e2) = spans
    for max_len, n_img, n_tok in [(a1 + 5, 0, a1), (e2, 1, a2), (e2 + 1, 2, e2 + 1), (10_000, 2, len(full))]:
        if n_img == 0:
            with pytest.raises(CalibrationError, match="cuts them all off"):
                build_bundle(data, tok, cfg, max_len=max_len)
            continue
        calib = build_bundle(data, tok, cfg, max_len=max_len)
        s = calib.samples[0]
        assert (s.n_tokens, s.n_images) == (n_tok, n_img) and s.input_ids.tolist() == full[:n_tok]
        assert s.truncated == (n_tok < len(full)) and calib.stats.images_dropped_by_truncation == 2 - n_img
        check_spans(s, tok, cfg)


def test_jsonl_and_json_lines_in_a_json_file(tmp_path, tok, cfg, suite) -> None:
    rows = json.loads(suite.read_text())
    ref = build_bundle(suite, tok, cfg)
    for name in ("rows.jsonl", "rows_as_lines.json"):
        path = write_rows(suite.parent / name, rows, jsonl=True)
        calib = build_bundle(path, tok, cfg)
        assert calib.stats.format == "jsonl"
        for a, b in zip(ref, calib, strict=True):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixels, b.pixels)


def test_datasets_save_to_disk_and_parquet(tmp_path, tok, cfg, suite) -> None:
    datasets = pytest.importorskip("datasets")
    rows = json.loads(suite.read_text())
    # (1) a conversations column with absolute image paths
    conv = [
        [{"from": t["from"], "value": t["value"].replace("<img>", f"<img>{suite.parent}/")} for t in r["conversations"]]
        for r in rows
    ]
    ds = datasets.Dataset.from_dict({"id": [r["id"] for r in rows], "conversations": conv})
    ds.save_to_disk(str(tmp_path / "conv_ds"))
    calib = build_bundle(tmp_path / "conv_ds", tok, cfg, num_samples=3)
    assert calib.stats.format == "datasets" and calib.stats.samples == 3 and calib.stats.images == 3
    assert any(k.endswith(".arrow") for k in calib.stats.source_sha256)
    # (2) image (PIL) + question + answer columns, saved with save_to_disk and as parquet
    samples = generate_suite(3, seed=1, split="calib")
    cols = {
        "image": [s.load_image() for s in samples],
        "question": [s.question for s in samples],
        "answer": [s.answer for s in samples],
    }
    feats = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    ds = datasets.Dataset.from_dict(cols, features=feats)
    ds.save_to_disk(str(tmp_path / "qa_ds"))
    ds.to_parquet(str(tmp_path / "qa.parquet"))
    for data, fmt in ((tmp_path / "qa_ds", "datasets"), (tmp_path / "qa.parquet", "parquet")):
        calib = build_bundle(data, tok, cfg)
        assert calib.stats.format == fmt and calib.stats.samples == 3
        for s in calib:
            src = samples[s.index]
            assert s.input_ids.tolist() == by_hand(tok, [(f"Picture 1: <img>image1</img>\n{src.question}", src.answer)])
            assert torch.equal(s.pixels[0], preprocess(src.load_image(), 448))
    # (3) captioning: image bytes + text only -> the text is the reply
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"image": [png_bytes(s.load_image()) for s in samples], "text": ["a caption"] * 3}),
        tmp_path / "cap.parquet",
    )
    s = build_bundle(tmp_path / "cap.parquet", tok, cfg).samples[0]
    assert s.input_ids.tolist() == by_hand(tok, [("Picture 1: <img>image1</img>\n", "a caption")])


def test_plain_text_paragraphs_and_chunks(tmp_path, tok, cfg) -> None:
    paras = ["First paragraph, about shapes.", "Second one\nspans two lines.", "Third."]
    (tmp_path / "p.txt").write_text("\n\n".join(paras) + "\n")
    calib = build_bundle(tmp_path / "p.txt", tok, cfg)
    assert calib.stats.format == "txt" and calib.stats.images == 0
    assert [s.input_ids.tolist() for s in calib] == [tok.encode_text(p) for p in paras]
    text = " ".join(f"word{i} is number {i}." for i in range(60))
    (tmp_path / "c.txt").write_text(text)
    calib = build_bundle(tmp_path / "c.txt", tok, cfg, max_len=32, num_samples=1000)
    ids = tok.encode_text(text)
    assert len(calib) == -(-len(ids) // 32) and all(s.n_tokens <= 32 for s in calib)
    assert sum((s.input_ids.tolist() for s in calib), []) == ids
    assert "using all" in calib.stats.note


def test_bad_rows_are_counted_and_strict_fails(tmp_path, tok, cfg, suite) -> None:
    shutil.copytree(suite.parent / "images", tmp_path / "images")
    good = json.loads(suite.read_text())[0]["conversations"]
    (tmp_path / "images" / "broken.png").write_bytes(b"this is not a png")

    def conv(user: str, role: str = "assistant") -> dict:
        return {"conversations": [{"from": "user", "value": user}, {"from": role, "value": "ok"}]}

    rows = [
        {"id": "good", "conversations": good},
        conv("Picture 1: <img>images/nope.png</img>\nhi"),
        conv("Picture 1: <img>images/broken.png</img>\nhi"),
        conv("Picture 1: <img>" + "d/" * 140 + "x.png</img>\nhi"),
        conv("hello", role="bot"),
        {"id": "empty", "conversations": []},
        "not an object",
        {"id": "g2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": [{"from": "user", "value": "no reply"}]},
        {"conversations": [{"from": "user"}]},
    ]
    data = write_rows(tmp_path / "bad.json", rows)
    calib = build_bundle(data, tok, cfg)
    assert sorted(s.id for s in calib) == ["g2", "good"]
    assert calib.stats.skipped == {
        "bad_roles": 2, "corrupt_image": 1, "empty_conversation": 1, "malformed_row": 2, "missing_image": 1,
        "path_too_long": 1,
    }  # fmt: skip
    assert set(calib.stats.skipped) <= set(SKIP_REASONS) and calib.stats.rows_examined == len(rows)
    with pytest.raises(CalibrationError, match=r"row \d+: \w+"):
        build_bundle(data, tok, cfg, strict=True, seed=3)
    # image markup everywhere but no picture loadable -> a clear error, not a silent text-only set
    rows = [conv("Picture 1: <img>images/nope.png</img>\nhi"), conv("plain question")]
    with pytest.raises(CalibrationError, match="none could be used.*image not found"):
        build_bundle(write_rows(tmp_path / "noimg.json", rows), tok, cfg)
    with pytest.raises(CalibrationError, match="no usable calibration rows"):
        build_bundle(write_rows(tmp_path / "allbad.json", ["x", {"conversations": []}]), tok, cfg)


def test_text_only_drops_all_pictures(tok, cfg, suite) -> None:
    calib = build_bundle(suite, tok, cfg, text_only=True)
    assert calib.stats.images == 0 and calib.stats.text_only and len(calib) == 6
    rows = json.loads(suite.read_text())
    for s in calib:
        ids = s.input_ids.tolist()
        assert s.pixels is None and tok.img_start_id not in ids and tok.img_pad_id not in ids
        assert "Picture" not in tok.decode(ids)
        q = rows[s.index]["conversations"][0]["value"].split("</img>\n", 1)[1]
        assert ids == by_hand(tok, [(q, rows[s.index]["conversations"][1]["value"])])


def test_sampling_is_seeded_and_builds_are_byte_identical(tmp_path, tok, cfg, suite) -> None:
    pick = [s.index for s in build_bundle(suite, tok, cfg, num_samples=3, seed=0)]
    assert pick == sorted(pick) and len(set(pick)) == 3
    assert pick == [s.index for s in build_bundle(suite, tok, cfg, num_samples=3, seed=0)]
    assert any([s.index for s in build_bundle(suite, tok, cfg, num_samples=3, seed=k)] != pick for k in (1, 2, 3))
    many = build_bundle(suite, tok, cfg, num_samples=50)
    assert many.stats.samples == 6 and "only 6 usable rows" in many.stats.note
    for name in ("a", "b"):
        save_bundle(build_bundle(suite, tok, cfg, num_samples=4, seed=7), tmp_path / name)
    for f in ("calibration.json", "calibration.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_mismatched_model_is_refused(tmp_path, tok, cfg, suite) -> None:
    save_bundle(build_bundle(suite, tok, cfg, num_samples=2), tmp_path / "b")
    small = preset_config("tiny")
    small.visual = dict(small.visual, image_size=224)
    with pytest.raises(CalibrationError, match="image_size=448.*image_size=224"):
        load_bundle(tmp_path / "b", expect_config=small)
    with pytest.raises(CalibrationError, match="n_queries=256.*n_queries=64"):
        load_calibration(tmp_path / "b", tok, {"n_queries": 64, "image_size": 448, "image_start_id": 151857})
    fewer = preset_config("tiny")
    fewer.visual = dict(fewer.visual, n_queries=64)
    with pytest.raises(CalibrationError, match="64"):  # the tokenizer writes 256-id spans
        build_bundle(suite, tok, fewer)
    with pytest.raises(CalibrationError, match="not a calibration bundle"):
        load_bundle(tmp_path)


def test_cli_json_and_clean_failure(tmp_path, model_dir, suite) -> None:
    runner = CliRunner()
    out = tmp_path / "bundle"
    args = ["calibrate", str(suite), "--model", str(model_dir), "--out", str(out), "--num-samples", "3"]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["bundle"] == str(out) and res["stats"]["samples"] == 3 and res["stats"]["images"] == 3
    assert is_bundle(out)
    r = runner.invoke(app, args)  # exists
    assert r.exit_code == 2 and "already exists" in r.stderr
    r = runner.invoke(app, [*args, "--overwrite", "--seed", "1"])
    assert r.exit_code == 0 and "calibration bundle" in r.stdout

    rows = json.loads(suite.read_text()) + [{"conversations": [{"from": "bot", "value": "x"}]}]
    bad = write_rows(suite.parent / "one_bad.json", rows)
    out2 = tmp_path / "nope"
    r = runner.invoke(app, ["calibrate", str(bad), "--model", str(model_dir), "--out", str(out2), "--strict"])
    assert r.exit_code == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "bad_roles" in lines[0]
    assert not out2.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    r = runner.invoke(app, ["calibrate", str(tmp_path / "missing.json"), "--model", str(model_dir), "--out", str(out2)])
    assert r.exit_code == 2 and "no such file" in r.stderr and not out2.exists()


def test_image_column_variants(tmp_path, tok, cfg) -> None:
    """Paths relative to the data file, lists of pictures, and a broken inline picture."""
    samples = generate_suite(2, seed=2, split="calib")
    for k, s in enumerate(samples):
        s.load_image().save(tmp_path / f"p{k}.png")
    rows = [
        {"id": "two", "image": ["p0.png", "p1.png"], "question": "Same?", "answer": "No."},
        {"id": "bytes_bad", "image": {"bytes": list(b"garbage"), "path": "x.png"}, "question": "?"},
    ]
    calib = build_bundle(write_rows(tmp_path / "cols.jsonl", rows, jsonl=True), tok, cfg)
    s = calib.samples[0]
    q = "Picture 1: <img>p0.png</img>\nPicture 2: <img>p1.png</img>\nSame?"
    assert s.input_ids.tolist() == by_hand(tok, [(q, "No.")]) and s.n_images == 2
    assert torch.equal(s.pixels[1], preprocess(Image.open(tmp_path / "p1.png"), 448))
    assert calib.stats.skipped == {"corrupt_image": 1}
