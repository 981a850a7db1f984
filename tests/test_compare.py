"""qvlq compare: the TouchStone loader and slicing, generation/teacher-forcing caches (reuse, a run killed
mid-write), the judge against a scripted local HTTP server (retries, exclusions, the key never written),
judge-free metrics, sharded runs that merge identically (in-process shards and two real processes) and
the CLI. Tiny models: the random tiny checkpoint in fp32 as "BF16" and a GPTQ Int4 made from it with two
calibration samples; 6 TouchStone rows (5 synthetic + a two-picture Chinese row), 6 new tokens."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import qvlq.compare as cmp
from qvlq.cli import app
from qvlq.compare import CompareError, CompareSettings, JsonlCache, plan_compare, report_json, run_compare, write_report
from qvlq.judge import OpenAIJudge, parse_scores
from qvlq.touchstone import (
    TSV_COLUMNS,
    TouchStoneError,
    TouchStoneItem,
    detect_lang,
    load_touchstone,
    select_items,
    split_image_cell,
    stratified_sample,
)

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 6
ZH_QUESTION = "这两张图片里的形状有什么不同？"
SECRET = "sk-test-DO-NOT-WRITE-0123456789"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


def _png_b64(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def models(root: Path) -> tuple[Path, Path]:
    """(fp32 tiny checkpoint as the "BF16" model, its GPTQ Int4)."""
    from qvlq.calibrate import build_bundle
    from qvlq.checkpoint import init_checkpoint
    from qvlq.mini.tasks import generate_suite, write_finetune_json
    from qvlq.model.loading import read_config
    from qvlq.quantize import quantize
    from qvlq.tokenizer import QWenTokenizer

    torch.set_num_threads(1)
    bf16, int4 = root / "tiny", root / "tiny-int4"
    init_checkpoint(bf16, "tiny", seed=0, dtype="fp32")
    data = write_finetune_json(generate_suite(2, seed=0, split="calib"), root / "calib", "calib")
    calib = build_bundle(data, QWenTokenizer.from_pretrained(str(bf16)), read_config(bf16), num_samples=2, max_len=300)
    quantize(bf16, calib, int4, device="cpu")
    return bf16, int4


@pytest.fixture(scope="module")
def tsv(root: Path) -> Path:
    """5 synthetic rows (write_touchstone_tsv) + one hand-written row: two pictures as a JSON list,
    comma-separated categories, a Chinese question."""
    from qvlq.mini.tasks import generate_suite, write_touchstone_tsv

    path = write_touchstone_tsv(generate_suite(5, seed=0, split="eval"), root / "touchstone.tsv")
    row = {
        "index": "5", "image": json.dumps([_png_b64((200, 30, 30)), _png_b64((30, 60, 220), (24, 48))]),
        "question": ZH_QUESTION, "human_annotation": "Picture 1 is a red rectangle; picture 2 is a blue one.",
        "gpt4_ha_answer": "第一张是红色的，第二张是蓝色的。", "category": "multi-image, comprehension",
        "task_name": "multi-image comparison",
    }  # fmt: skip
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, fieldnames=TSV_COLUMNS, delimiter="\t", lineterminator="\n").writerow(row)
    return path


def _settings(models: tuple[Path, Path], tsv: Path, out: Path, **kw) -> CompareSettings:
    base = dict(bf16=str(models[0]), int4=str(models[1]), data=str(tsv), max_new_tokens=NEW_TOKENS, dtype="fp32",
                out=str(out))  # fmt: skip
    return CompareSettings(**{**base, **kw})


def _count_calls(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, int]:
    """Count calls of qvlq.compare's chat / teacher_force (they still run)."""
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(cmp, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(cmp, name, counted)
    return calls


def _no_loading(model_dir: str):
    raise AssertionError(f"model {model_dir} loaded although everything is cached")


def _cached_reference(single, **kw):
    """The single-process report of a sub-slice, straight from the full run's cache (no model work)."""
    s, _ = single
    return run_compare(CompareSettings(**{**vars(s), **kw}), loader=_no_loading).report


def _result(report) -> dict:
    """The report JSON without the run section (paths, process count, timings)."""
    d = report_json(report) if not isinstance(report, dict) else dict(report)
    d.pop("run")
    return d


@pytest.fixture(scope="module")
def single(models, tsv, root):
    """The reference single-process run over all 6 items (greedy, no judge)."""
    torch.set_num_threads(1)
    s = _settings(models, tsv, root / "single")
    run = run_compare(s)
    write_report(run.report, root / "single")
    return s, run


# ------------------------------------------------------------------------------------------ data
def test_loader_reads_the_synthetic_slice_and_a_multi_image_row(tsv):
    from qvlq.mini.tasks import generate_suite, reference_answer

    items = load_touchstone(tsv)
    assert [it.index for it in items] == ["0", "1", "2", "3", "4", "5"]
    for it, sample in zip(items, generate_suite(5, seed=0, split="eval"), strict=False):
        assert it.question == sample.question and it.reference == reference_answer(sample)
        assert len(it.images) == 1 and it.lang == "en" and it.categories[0] == "recognition"
        assert it.query() == f"Picture 1: <img>touchstone/{it.index}_1.png</img>\n{it.question}"
    multi = items[5]
    assert multi.categories == ("multi-image", "comprehension") and multi.lang == "zh"
    assert multi.task_name == "multi-image comparison" and multi.reference.startswith("第一张")
    assert multi.query() == (
        "Picture 1: <img>touchstone/5_1.png</img>\nPicture 2: <img>touchstone/5_2.png</img>\n" + ZH_QUESTION
    )
    pics = multi.pil_images()
    assert [p.size for p in pics] == [(40, 30), (24, 48)] and pics[1].getpixel((0, 0)) == (30, 60, 220)
    assert len({it.uid for it in items}) == 6 and multi.uid.startswith("5-")


def test_image_cell_encodings():
    a, b = _png_b64((1, 2, 3)), _png_b64((4, 5, 6))
    wrapped = "\n".join(a[i : i + 76] for i in range(0, len(a), 76))  # one MIME-wrapped picture
    for cell in (a, f" {a}\n", f"data:image/png;base64,{a}", wrapped):
        assert split_image_cell(cell) == [a]
    for cell in (
        json.dumps([a, b]), str([a, b]), f"{a},{b}", f"{a};{b}", f"{a}|{b}", f"{a}\n{b}", f"{a} {b}",
        f"data:image/png;base64,{a},data:image/png;base64,{b}", json.dumps([f"data:image/png;base64,{a}", b]),
    ):  # fmt: skip
        assert split_image_cell(cell) == [a, b], cell[:40]
    assert split_image_cell("") == []
    with pytest.raises(TouchStoneError, match="list"):
        split_image_cell("[1, 2]")


def test_language_rule():
    assert detect_lang("What colour is the square?") == "en"
    assert detect_lang("图中有几个圆？") == "zh" and detect_lang("Describe 猫 please") == "zh"
    assert detect_lang("Ｗhat？ café ñ") == "en"  # fullwidth Latin / punctuation are not Han


def _fake(n: int, cats: str, start: int = 0, lang: str = "en") -> list[TouchStoneItem]:
    return [TouchStoneItem(f"{i}-x", str(i), ("",), f"q{i}", "", "", tuple(cats.split(",")), "t", lang)
            for i in range(start, start + n)]  # fmt: skip


def test_stratified_slicing_is_deterministic_and_keeps_proportions():
    items = _fake(60, "a") + _fake(30, "b", 60) + _fake(10, "a,c", 90, lang="zh")
    pick = stratified_sample(items, 10, seed=3)
    cats = [it.categories for it in pick]
    assert (cats.count(("a",)), cats.count(("b",)), cats.count(("a", "c"))) == (6, 3, 1)
    assert pick == stratified_sample(items, 10, seed=3)  # same seed, same items
    assert pick != stratified_sample(items, 10, seed=4)
    assert [int(it.index) for it in pick] == sorted(int(it.index) for it in pick)  # file order kept
    assert stratified_sample(items, 500, seed=0) == items
    # odd sizes: largest remainders, total exact
    assert len(stratified_sample(items, 7, seed=0)) == 7
    assert [it.index for it in select_items(items, category="C")] == [str(i) for i in range(90, 100)]
    assert len(select_items(items, category="a")) == 70 and len(select_items(items, lang="zh")) == 10
    assert len(select_items(items, category="a", limit=7, seed=1)) == 7
    with pytest.raises(TouchStoneError, match="unknown category d"):
        select_items(items, category="d")
    with pytest.raises(TouchStoneError, match="unknown task"):
        select_items(items, task="nope")


# ------------------------------------------------------------------------------------------ runs
def test_single_run_metrics_and_report(single, root):
    s, run = single
    rep = run.report
    assert run.shard.generated == {"bf16": 6, "int4": 6} and run.shard.teacher_forced == 6
    assert [i.lang for i in rep.items] == ["en"] * 5 + ["zh"] and rep.items[5].n_images == 2
    m = {x.name: x for x in rep.judge_free}
    assert m["kl_bf16_int4_per_token"].value > 0 and m["kl_bf16_int4_per_token"].n == 6  # different models
    assert 0 <= m["top1_agreement"].value <= 1 and 0 <= m["exact_match"].value <= 1
    assert m["tokens_bf16"].value <= NEW_TOKENS and m["chars_int4"].value > 0
    for x in [*rep.judge_free, *(getattr(c, k) for c in rep.categories for k in ("kl", "top1", "exact_match"))]:
        if x.n:  # every bootstrap interval brackets its estimate
            assert x.ci_low - 1e-12 <= x.value <= x.ci_high + 1e-12, x
    for it in rep.items:
        tf = it.teacher_forced
        assert tf.n_tokens > 0 and tf.kl >= 0 and tf.ll_bf16 < 0 and tf.ll_int4 < 0
        assert it.exact_match == (it.responses["bf16"] == it.responses["int4"])
    cats = {c.category: c.n_items for c in rep.categories}
    n_comp = sum("comprehension" in it.categories for it in rep.items)
    assert cats["recognition"] == 5 and cats["multi-image"] == 1 and cats["comprehension"] == n_comp >= 1
    assert rep.touchstone == {} and rep.judge_failures == {}
    out = Path(s.out)
    assert sorted(p.name for p in out.iterdir()) == ["cache", "report.json", "report.md", "report.svg"]
    md = (out / "report.md").read_text()
    assert "| BF16 (seed, published) | 645.2 | 401.2 | - |" in md and "KL(BF16" in md
    assert (out / "report.svg").read_text().lstrip().startswith("<svg")
    assert _result(json.loads((out / "report.json").read_text())) == _result(rep)


def test_cache_reuse_runs_no_model(single, monkeypatch):
    s, run = single
    calls = _count_calls(monkeypatch, "chat", "teacher_force")
    again = run_compare(s, loader=_no_loading)
    assert calls == {"chat": 0, "teacher_force": 0} and again.shard.generated == {"bf16": 0, "int4": 0}
    assert _result(again.report) == _result(run.report)


def test_killed_midway_cache_resumes(single, models, tsv, root, monkeypatch):
    s, run = single
    cache = root / "killed" / "cache"
    shutil.copytree(Path(s.out) / "cache", cache)
    gen = cache / "generations.main.jsonl"
    lines = gen.read_bytes().splitlines(keepends=True)
    assert len(lines) == 12  # bf16 then int4 per item
    gen.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # killed while writing the last
    calls = _count_calls(monkeypatch, "chat", "teacher_force")
    resumed = run_compare(_settings(models, tsv, root / "killed", cache=str(cache)))
    assert calls == {"chat": 1, "teacher_force": 0} and resumed.shard.generated == {"bf16": 0, "int4": 1}
    a, b = _result(resumed.report), _result(run.report)
    assert a["items"] == b["items"] and a["judge_free"] == b["judge_free"]
    assert any("1 unreadable cache line" in n for n in resumed.report.notes)
    new = gen.read_bytes().split(b"\n")
    assert json.loads(new[-2])["response"] == run.report.items[-1].responses["int4"]  # on a line of its own
    assert JsonlCache(cache, "generations", "x", cmp.GEN_KEY).skipped_lines == 1


def test_identical_models_agree_exactly(models, tsv, root):
    int4 = str(models[1])
    rep = run_compare(_settings(models, tsv, root / "same", bf16=int4, int4=int4, limit=2, max_new_tokens=4)).report
    m = {x.name: x for x in rep.judge_free}
    assert m["kl_bf16_int4_per_token"].value == 0 and m["top1_agreement"].value == 1
    assert m["exact_match"].value == 1 and m["logprob_per_token_delta"].value == 0
    assert (m["kl_bf16_int4_per_token"].ci_low, m["kl_bf16_int4_per_token"].ci_high) == (0, 0)


def test_grounding_iou_between_first_boxes(models, tsv, root):
    s = _settings(models, tsv, root / "ground", limit=3, seed=1)
    plan = plan_compare(s)
    fp, dec = plan.fingerprints, plan.decoding_id
    answers = [  # (bf16, int4): IoU 0.5; a box against none; no box at all (not a grounding item)
        ("<ref>red circle</ref><box>(100,100),(300,300)</box>", "<ref>red circle</ref><box>(100,100),(300,200)</box>"),
        ("<ref>a square</ref><box>(0,0),(500,500)</box>", "a square"),
        ("blue", "blue"),
    ]  # fmt: skip
    cache = JsonlCache(plan.cache_dir, "generations", "main", cmp.GEN_KEY)
    for it, pair in zip(plan.items, answers, strict=True):
        for m, text in zip(cmp.MODELS, pair, strict=True):
            cache.put({"model": fp[m], "item": it.uid, "decoding": dec, "response": text, "n_tokens": 1})
    cache.close()
    run = run_compare(s)
    assert run.shard.generated == {"bf16": 0, "int4": 0} and run.shard.teacher_forced == 3
    assert [i.grounding_iou for i in run.report.items] == [pytest.approx(0.5), 0.0, None]
    g = next(x for x in run.report.judge_free if x.name == "grounding_iou")
    assert g.n == 2 and g.value == pytest.approx(0.25) and g.ci_low <= g.value <= g.ci_high
    assert next(x for x in run.report.judge_free if x.name == "exact_match").value == pytest.approx(1 / 3)


def test_in_process_shards_merge_identically(single, models, tsv, root):
    sharded = _settings(models, tsv, root / "shards", limit=3, seed=2)
    first = run_compare(sharded, shard=(0, 2))
    assert first.report is None and first.shard.items == 2
    with pytest.raises(CompareError, match="1 of 3 items have no cached results"):
        run_compare(sharded, merge_only=True)
    run_compare(sharded, shard=(1, 2))
    parts = sorted(p.name for p in (root / "shards" / "cache").glob("*.jsonl"))
    assert parts == [f"{k}.rank{r}-of-2.jsonl" for k in ("generations", "teacher_forcing") for r in (0, 1)]
    merged = run_compare(sharded, merge_only=True, loader=_no_loading).report
    assert _result(merged) == _result(_cached_reference(single, limit=3, seed=2))


def test_two_processes_merge_identically(single, models, tsv, root):
    """RANK/WORLD_SIZE as torchrun sets them: rank 1 is a `qvlq compare` process writing its cache part,
    rank 0 (this process, to save an import of torch) does its share, waits for rank 1 and merges."""
    out = root / "ranks"
    args = [sys.executable, "-m", "qvlq.cli", "compare", "--bf16", str(models[0]), "--int4", str(models[1]),
            "--data", str(tsv), "--max-new-tokens", str(NEW_TOKENS), "--dtype", "fp32", "--out", str(out), "--json",
            "--limit", "4", "--seed", "5"]  # fmt: skip
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    rank1 = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        s = _settings(models, tsv, out, limit=4, seed=5)
        rank0 = run_compare(s, env={"RANK": "0", "WORLD_SIZE": "2"}, wait_timeout_s=240)
    finally:
        stdout, stderr = rank1.communicate(timeout=240)
    assert rank1.returncode == 0, stderr.decode()[-2000:]
    assert stdout == b"" and "shard 1/2: 2 items" in stderr.decode()  # stdout is rank 0's (the report JSON)
    assert rank0.shard.items == 2 and rank0.report.run["processes"] == 2
    assert _result(rank0.report) == _result(_cached_reference(single, limit=4, seed=5))
    assert sorted(p.name for p in (out / "cache").glob("generations.*")) == [
        "generations.rank0-of-2.jsonl", "generations.rank1-of-2.jsonl"
    ]


def test_rank_failure_and_timeout_reach_rank_0(models, tsv, root):
    plan = plan_compare(_settings(models, tsv, root / "fail", limit=2))
    marker = cmp._shard_marker(plan, 1, 2)
    with pytest.raises(CompareError, match="timed out waiting for rank.s. 0, 1 of 2"):
        cmp.wait_for_shards(plan, 2, timeout_s=0.0, sleep=lambda _: None)
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"rank": 1, "world": 2, "error": "CUDA out of memory"}))
    with pytest.raises(CompareError, match="rank 1 of 2 failed: CUDA out of memory"):
        cmp.wait_for_shards(plan, 2, timeout_s=60.0, sleep=lambda _: None)


# ------------------------------------------------------------------------------------------ judge
def test_parse_scores():
    assert parse_scores("8 7\nBoth are fine.") == (8.0, 7.0)
    assert parse_scores("\n  8.5, 6\nwhy") == (8.5, 6.0)
    for bad in ("Scores: 8 7", "8", "8 7 6", "11 3", "", "great answers\n8 7"):
        assert parse_scores(bad) is None, bad


class _Judge(BaseHTTPRequestHandler):
    """Scripted judge: requests 1-3 fail (500, too slow, garbage first line); prompts about the Chinese
    row always fail (500); otherwise the reference answer gets 9 and the model's answer 4."""

    state: dict = {}

    def log_message(self, *a) -> None:  # keep pytest output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with st["lock"]:
            st["n"] += 1
            n = st["n"]
            st["auth"].add(self.headers.get("Authorization"))
            st["bodies"].append(body)
        user = body["messages"][1]["content"]
        a1 = user.split("[The Start of Assistant 1's Answer]\n", 1)[1].split("\n[The End of Assistant 1's Answer]")[0]
        if n == 1 or ZH_QUESTION in user:
            return self._reply(500, {"error": "scripted"})
        if n == 2:
            time.sleep(0.8)  # past the client's 0.4 s timeout
        content = "Great answers!\n8 7" if n == 3 else ("9 4" if a1 in st["references"] else "4 9") + "\nbecause"
        try:
            self._reply(200, {"choices": [{"message": {"role": "assistant", "content": content}}]})
        except OSError:
            pass  # the client gave up (timeout)

    def _reply(self, code: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def judge_server(tsv):
    _Judge.state = {"n": 0, "lock": threading.Lock(), "auth": set(), "bodies": [],
                    "references": {it.reference for it in load_touchstone(tsv)}}  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", _Judge.state
    server.shutdown()
    server.server_close()


def test_judge_end_to_end(single, models, tsv, root, judge_server, monkeypatch):
    url, state = judge_server
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QVLQ_TEST_JUDGE_KEY", SECRET)
    s0, run0 = single
    out = root / "judged"
    shutil.copytree(Path(s0.out) / "cache", out / "cache")  # generations cached: only the judge runs
    s = _settings(models, tsv, out, judge="openai", judge_url=url, judge_model="judge-x",
                  judge_key_env="QVLQ_TEST_JUDGE_KEY", judge_timeout=0.4, judge_workers=1)  # fmt: skip
    sleeps: list[float] = []
    rep = run_compare(s, sleep=sleeps.append).report
    write_report(rep, out)

    # 6 items x 2 models x 2 orders = 24 prompts (an item both models answered alike gives one prompt per
    # order: the judge cache answers the second); the zh prompts fail 6 times each, the first one 3 times
    same_en = sum(i.exact_match for i in rep.items if i.lang == "en")
    assert state["n"] == (20 - 2 * same_en) + 3 + 4 * 6
    assert sleeps == [1, 2, 4] + [1, 2, 4, 8, 16] * 4  # exponential backoff, 5 retries
    assert state["auth"] == {f"Bearer {SECRET}"}
    body = state["bodies"][0]
    assert body["model"] == "judge-x" and body["temperature"] == 0
    assert body["messages"][0]["role"] == "system" and "[Image Description]" in body["messages"][1]["content"]
    for m in ("bf16", "int4"):
        en, zh, al = (rep.touchstone[m][k] for k in ("en", "zh", "all"))
        assert (en.score, en.n_items, en.n_rounds, en.failed_rounds) == (400.0, 5, 10, 0)
        assert en.reference_score == 900.0 and en.ci_low == en.ci_high == 400.0
        assert (zh.score, zh.failed_rounds) == (None, 2) and al.score == 400.0
        assert rep.judge_failures[m]["failed_rounds"] == 2 and rep.judge_failures[m]["by_kind"] == {"http 500": 2}
    assert rep.touchstone["delta"]["en"].score == 0.0
    multi = next(c for c in rep.categories if c.category == "multi-image")
    assert multi.touchstone["int4"].score is None and multi.touchstone["int4"].failed_rounds == 2
    first = rep.items[0].judge["bf16"][0]
    assert (first.order, first.model_score, first.reference_score, first.attempts) == ("reference_first", 4, 9, 4)
    md = (out / "report.md").read_text()
    assert "400.0 [400.0, 400.0] (n=5)" in md and "http 500 x2" in md

    # judged rounds are cached: a rerun only retries the excluded ones
    state["n"] = 0
    again = run_compare(s, sleep=lambda _: None).report
    assert state["n"] == 4 * 6 and _result(again)["touchstone"] == _result(rep)["touchstone"]

    # the key is sent, never written
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("judge.") for p in written)
    for p in written:
        assert SECRET not in p.read_text(errors="replace"), p
    assert SECRET not in json.dumps(report_json(rep)) and SECRET not in repr(OpenAIJudge.from_settings(s))


# ------------------------------------------------------------------------------------------ CLI
def test_cli_json(single, models, tsv):
    s, run = single
    args = ["compare", "--bf16", str(models[0]), "--int4", str(models[1]), "--data", str(tsv),
            "--max-new-tokens", str(NEW_TOKENS), "--dtype", "fp32", "--out", s.out, "--json"]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert _result(json.loads(r.stdout)) == _result(run.report)
    shard = CliRunner().invoke(app, [*args, "--shard", "1/2"])
    assert shard.exit_code == 0 and json.loads(shard.stdout)["generated"] == {"bf16": 0, "int4": 0}


def test_int4_kernel_reaches_the_int4_layers(models):
    """--int4-kernel (CompareSettings.int4_kernel) is the backend the loader prepares the Int4 model's layers with."""
    from qvlq.compare import default_loader
    from qvlq.int4 import int4_backends

    for kernel, want in (("auto", "dequant"), ("int4_cpu", "int4_cpu")):  # CPU: auto means dequant
        model, _ = default_loader("cpu", "auto", kernel)(str(models[1]))
        assert set(int4_backends(model)) == {want}


def test_stream_vision_reaches_both_models(models):
    from qvlq.compare import default_loader
    from qvlq.model.stream import StreamedBlocks

    for d in models:
        model, _ = default_loader("cpu", "fp32", "auto", stream_vision=True)(str(d))
        assert isinstance(model.transformer.visual.transformer, StreamedBlocks)


def test_cli_bad_input_is_one_line_exit_2(models, tsv, tmp_path):
    no_cols = tmp_path / "bad.tsv"
    no_cols.write_text("index\tquestion\n0\thello\n")
    base = ["compare", "--bf16", str(models[0]), "--int4", str(models[1]), "--out", str(tmp_path / "o")]
    cases = {
        "not found": [*base, "--data", str(tmp_path / "missing.tsv")],
        "missing column(s): image, human_annotation": [*base, "--data", str(no_cols)],
        "unknown category storytelling": [*base, "--data", str(tsv), "--category", "storytelling"],
        "not a GPTQ checkpoint": ["compare", "--bf16", str(models[0]), "--int4", str(models[0]), "--data", str(tsv)],
        "--shard takes i/n": [*base, "--data", str(tsv), "--shard", "2/2"],
        "--judge must be none or openai": [*base, "--data", str(tsv), "--judge", "gpt"],
        "--int4-kernel triton needs a CUDA device": [*base, "--data", str(tsv), "--device", "cpu", "--int4-kernel",
                                                     "triton"],  # fmt: skip
    }
    for msg, args in cases.items():
        r = CliRunner().invoke(app, args)
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and r.stdout == "" and len(lines) == 1 and msg in lines[0], (msg, r.output)
    assert not (tmp_path / "o").exists()
