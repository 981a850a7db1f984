"""qvlq-mini: vocabulary trainer, training-data rendering, a micro training run and eval-tasks."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from qvlq.chat import chat, make_context
from qvlq.mini.evaluate import build_query, evaluate_tasks, sample_pixels
from qvlq.mini.model import IMG_START_OFFSET, MICRO, mini_config, padded_vocab
from qvlq.mini.tasks import Task, generate_suite
from qvlq.mini.train import (
    TrainOptions,
    batch_loss,
    build_pool,
    image_slot,
    init_model,
    lr_at,
    render_sample,
    train_mini,
)
from qvlq.mini.vocab import build_vocab, train_bpe
from qvlq.tokenizer import QWenTokenizer, load_tiktoken_ranks

OFFICIAL_FILES = {
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "qwen.tiktoken",
    "model-00001-of-00001.safetensors",
    "model.safetensors.index.json",
}


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return build_vocab()


@pytest.fixture(scope="module")
def tok(ranks: dict[bytes, int]) -> QWenTokenizer:
    return QWenTokenizer(mergeable_ranks=ranks, image_span=MICRO.n_queries)


@pytest.fixture(scope="module")
def micro_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("mini") / "micro"
    opts = TrainOptions(
        size="micro", steps=5, batch=4, warmup=2, pool=24, eval_n=6, final_eval_n=12, workers=1, threads=1,
    )  # fmt: skip
    return out, train_mini(out, opts)


# ---- vocabulary ---------------------------------------------------------------------------------


def test_vocab_is_deterministic_and_byte_complete(ranks: dict[bytes, int]) -> None:
    assert build_vocab() == ranks
    assert 1500 <= len(ranks) <= 4000
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(ranks[bytes([b])] == b for b in range(256))
    # every merge is the concatenation of two earlier tokens
    by_rank = sorted(ranks, key=ranks.get)
    for i, t in enumerate(by_rank[256:300], 256):
        assert any(ranks.get(t[:k], i) < i and ranks.get(t[k:], i) < i for k in range(1, len(t)))


def test_train_bpe_small_corpus() -> None:
    counts = {b"hello": 5, b" hello": 3, b" world": 2}
    r = train_bpe(counts, n_ranks=300)
    assert r[b"hello"] < r[b" hello"] and b" world" in r
    assert train_bpe(counts, n_ranks=258) == {**{bytes([i]): i for i in range(256)}, **dict(list(r.items())[256:258])}


ROUND_TRIP = [
    "2024-05-17 12:30 $5.99",
    "你好，世界",
    "emoji 🙂👍🏽 and é",
    "<ref>the red cross</ref><box>(1,2),(3,4)</box>",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_mini_vocab_round_trips(tok: QWenTokenizer, text: str) -> None:
    ids = tok.encode_text(text)
    assert tok.decode(ids) == text
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert all(len(d.strip()) == 1 for d in digits)  # digits one per token


def test_vocab_file_round_trip(ranks: dict[bytes, int], tmp_path: Path) -> None:
    from qvlq.mini.vocab import write_vocab

    path = write_vocab(tmp_path / "qwen.tiktoken", ranks)
    assert load_tiktoken_ranks(path) == ranks


def test_suite_text_is_compact(tok: QWenTokenizer) -> None:
    assert len(tok.encode_text("What color is the circle?")) <= 7
    for word in ("CAT", "TREE", "assistant", "system", "user"):
        assert len(tok.encode_text(word)) == 1


# ---- config and rendering -----------------------------------------------------------------------


def test_mini_config_geometry(ranks: dict[bytes, int]) -> None:
    cfg = mini_config(len(ranks))
    tok = QWenTokenizer(mergeable_ranks=ranks, image_span=cfg.n_queries)
    assert cfg.image_start_id == tok.img_start_id == len(ranks) + IMG_START_OFFSET
    assert cfg.vocab_size == padded_vocab(len(ranks)) >= len(tok) and cfg.vocab_size % 64 == 0
    assert cfg.hidden_size % 128 == 0 and (cfg.intermediate_size // 2) % 128 == 0
    assert cfg.visual["output_dim"] == cfg.hidden_size and math.isqrt(cfg.n_queries) ** 2 == cfg.n_queries


def test_render_matches_chat_prompt(tok: QWenTokenizer) -> None:
    samples = generate_suite(30, seed=1, split="train", render=False)
    assert {s.task for s in samples} == set(Task)
    slot = image_slot(tok)
    for s in samples:
        ids, labels = render_sample(tok, s.question, s.answer)
        prompt = make_context(tok, build_query(s.question), history=[])[1]
        answer = tok.encode_text(s.answer) + [tok.im_end_id]
        assert ids == prompt + answer
        assert labels == [-100] * len(prompt) + answer
        assert tok.decode([t for t in labels if t != -100]) == s.answer + "<|im_end|>"
        assert ids[slot - 1] == tok.img_start_id and ids[slot + MICRO.n_queries] == tok.img_end_id


def test_pool_matches_render(tok: QWenTokenizer) -> None:
    pool = build_pool(tok, 12, seed=2, image_size=MICRO.image_size, workers=1)
    samples = generate_suite(12, seed=2, split="train")
    for i, s in enumerate(samples):
        ids, labels = render_sample(tok, s.question, s.answer)
        n = int(pool.lengths[i])
        assert pool.ids[i, :n].tolist() == ids and pool.labels[i, :n].tolist() == labels
        assert (pool.labels[i, n:] == -100).all()
        assert pool.tasks[i] is s.task
    px = sample_pixels(samples[:2], MICRO.image_size)
    from qvlq.image import CLIP_MEAN, CLIP_STD

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    mine = (pool.images[:2].permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    torch.testing.assert_close(mine, px)


def test_batch_loss_equals_model_loss(ranks: dict[bytes, int], tok: QWenTokenizer) -> None:
    cfg = mini_config(len(ranks), MICRO)
    model = init_model(cfg, seed=0)
    pool = build_pool(tok, 4, seed=0, image_size=MICRO.image_size, workers=1)
    samples = generate_suite(4, seed=0, split="train")
    pixels = sample_pixels(samples, MICRO.image_size)
    n = int(pool.lengths.max())
    ids, labels = pool.ids[:, :n].long(), pool.labels[:, :n].long()
    fast = batch_loss(model, ids, labels, pixels, image_slot(tok))
    ref = model(ids, images=pixels, labels=labels, use_cache=False).loss
    torch.testing.assert_close(fast, ref)


def test_parallel_render_and_refresh(tok: QWenTokenizer) -> None:
    from qvlq.mini.train import Buffers, Pool, Renderer, max_sample_len

    size, n = MICRO.image_size, 10
    inline = build_pool(tok, n, seed=4, image_size=size, workers=1)
    forked = build_pool(tok, n, seed=4, image_size=size, workers=2)
    for a, b in [(inline.images, forked.images), (inline.ids, forked.ids), (inline.labels, forked.labels)]:
        assert torch.equal(a, b)
    # a fresh block (train indices n..n+3) replaces rows 4..7
    stage = Buffers.allocate(4, size, max_sample_len(tok.image_span), tok.image_span)
    r = Renderer(tok, 4, size, {"stage": stage}, workers=1)
    r.wait(r.submit("stage", n, 4))
    r.close()
    inline.replace(4, stage)
    full = build_pool(tok, n + 4, seed=4, image_size=size, workers=1)
    assert torch.equal(inline.images[4:8], full.images[n:]) and torch.equal(inline.ids[4:8], full.ids[n:])
    assert inline.tasks[4:8] == full.tasks[n:] and inline.lengths[4:8].tolist() == full.lengths[n:].tolist()
    assert torch.equal(inline.cells[4:8], full.cells[n:])
    # a second tokenizer in the same process gets its own token ids (image span 64, not 16)
    other = QWenTokenizer(mergeable_ranks=tok.mergeable_ranks, image_span=64)
    wide = build_pool(other, 2, seed=4, image_size=size, workers=1)
    assert int(wide.lengths[0]) == int(full.lengths[0]) + 48
    w = Pool.sampling_weights(inline, {"ground": 2.0})
    assert float(w.sum()) == pytest.approx(sum(2.0 if t is Task.GROUND else 1.0 for t in set(inline.tasks)))


def test_local_resampler_init_keeps_images_apart(ranks: dict[bytes, int]) -> None:
    from qvlq.mini.model import MiniSize
    from qvlq.model.vision import resize_pos_table

    size = MiniSize()
    model = init_model(mini_config(len(ranks), size), seed=0).eval()
    samples = generate_suite(6, seed=0, split="eval")
    pixels = sample_pixels(samples, size.image_size)
    v = model.transformer.visual
    ap = v.attn_pool
    with torch.no_grad():
        feats = v(pixels)
        x = v.conv1(pixels).flatten(2).transpose(1, 2)
        x = v.transformer(v.ln_pre(x + resize_pos_table(v.positional_embedding, x.shape[1])))
        kv = ap.ln_kv(ap.kv_proj(x))
        q = (ap.ln_q(ap.query) + ap.pos_embed).unsqueeze(0).expand(len(samples), -1, -1)
        _, w = ap.attn(q, kv + ap.pos_embed, kv, need_weights=True)
    # each query attends mostly to its own grid cell, so pictures stay distinguishable
    assert (w.argmax(-1) == torch.arange(size.n_queries)).float().mean() > 0.8
    assert float(feats.std(0).mean() / feats.std(-1).mean()) > 0.15


def test_vision_freeze_schedule() -> None:
    from qvlq.mini.train import vision_lr_factor

    o = TrainOptions(vision_freeze=0.1, vision_ramp=0.05)
    assert vision_lr_factor(0, o, 1000) == 0.0 and vision_lr_factor(99, o, 1000) == 0.0
    assert vision_lr_factor(100, o, 1000) == pytest.approx(1 / 50)
    assert vision_lr_factor(149, o, 1000) == 1.0 and vision_lr_factor(900, o, 1000) == 1.0
    assert vision_lr_factor(0, TrainOptions(vision_freeze=0.0, vision_ramp=0.0), 10) == 1.0


def test_cell_labels_mark_shapes_and_words() -> None:
    from qvlq.mini.tasks import PALETTE, SHAPE_KINDS, WORDS
    from qvlq.mini.train import N_CELL_CLASSES, cell_labels

    for s in generate_suite(20, seed=7, split="train", render=False):
        grid = 8
        lab = cell_labels(s.scene, grid)
        assert lab.shape == (64,) and lab.max() < N_CELL_CLASSES
        for shape in s.scene.shapes:
            x1, y1, x2, y2 = shape.bbox
            r, c = int((y1 + y2) / 2 / s.scene.height * grid), int((x1 + x2) / 2 / s.scene.width * grid)
            want = 1 + list(PALETTE).index(shape.color) * len(SHAPE_KINDS) + SHAPE_KINDS.index(shape.kind)
            # the cell holding the shape's centre, or a neighbour whose centre the box covers
            near = {lab[rr * grid + cc] for rr in range(max(0, r - 1), min(grid, r + 2))
                    for cc in range(max(0, c - 1), min(grid, c + 2))}  # fmt: skip
            assert want in near
        word = s.scene.text
        assert (lab > len(PALETTE) * len(SHAPE_KINDS)).any() == (word is not None)
        if word is not None:
            assert 1 + len(PALETTE) * len(SHAPE_KINDS) + WORDS.index(word.text) in lab


def test_lr_schedule() -> None:
    o = TrainOptions(lr=1e-3, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, o, 100) == pytest.approx(1e-4)
    assert lr_at(9, o, 100) == pytest.approx(1e-3)
    assert lr_at(100, o, 100) == pytest.approx(1e-4)
    assert lr_at(55, o, 100) == pytest.approx(0.55e-3, rel=0.02)


# ---- a micro training run -----------------------------------------------------------------------


def test_micro_checkpoint_layout(micro_ckpt: tuple[Path, object]) -> None:
    out, result = micro_ckpt
    assert OFFICIAL_FILES | {"train_log.json"} == {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen" and cfg["torch_dtype"] == "float16"
    assert cfg["visual"]["n_queries"] == MICRO.n_queries and cfg["visual"]["image_size"] == MICRO.image_size
    assert json.loads((out / "tokenizer_config.json").read_text())["image_span"] == MICRO.n_queries
    gen = json.loads((out / "generation_config.json").read_text())
    n_ranks = len(load_tiktoken_ranks(out / "qwen.tiktoken"))
    assert gen["do_sample"] is False and gen["chat_format"] == "chatml" and gen["eos_token_id"] == n_ranks
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00001.safetensors"}
    with safe_open(str(out / "model-00001-of-00001.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 5 and log["seed"] == 0 and log["loss_curve"]
    assert set(log["final_eval"]["scores"]) >= {"all"} and log["torch"] == torch.__version__
    assert result.steps == 5 and math.isfinite(result.final_loss)


def test_micro_checkpoint_loads_with_auto_classes(micro_ckpt: tuple[Path, object]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qvlq  # noqa: F401  (registers the classes)

    out, _ = micro_ckpt
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert isinstance(tok, QWenTokenizer) and tok.image_span == MICRO.n_queries
    assert model.config.n_queries == MICRO.n_queries
    s = generate_suite(1, seed=0, split="eval")[0]
    reply, history = chat(model, tok, build_query(s.question), history=None, images=[s.load_image()], max_new_tokens=8)
    assert isinstance(reply, str) and len(history) == 1


def test_batched_eval_matches_chat(micro_ckpt: tuple[Path, object]) -> None:
    from qvlq.mini.evaluate import load_model

    out, _ = micro_ckpt
    model, tok = load_model(str(out), device="cpu")
    samples = generate_suite(8, seed=5, split="eval")
    fast = evaluate_tasks(model, tok, samples, batch_size=3, max_new_tokens=10)
    ref = evaluate_tasks(model, tok, samples, method="chat", max_new_tokens=10)
    assert [p["prediction"] for p in fast.predictions] == [p["prediction"] for p in ref.predictions]
    assert fast.scores["all"]["n"] == 8


def test_time_budget_stops_early_with_valid_checkpoint(tmp_path: Path) -> None:
    opts = TrainOptions(
        size="micro", steps=1000, batch=2, warmup=2, pool=8, eval_n=2, final_eval_n=6, workers=1, threads=1,
        time_budget=1.0,
    )  # fmt: skip
    res = train_mini(tmp_path / "m", opts)
    assert res.stopped_early and 1 <= res.steps < 1000
    log = json.loads((tmp_path / "m" / "train_log.json").read_text())
    assert log["stopped_early"] and log["stop_reason"] == "time budget"
    assert OFFICIAL_FILES <= {p.name for p in (tmp_path / "m").iterdir()}


def budget_options(seconds: float) -> TrainOptions:
    """A micro run whose 100k-step horizon only the time budget can shorten."""
    return TrainOptions(
        size="micro", steps=100_000, batch=2, warmup=40, pool=16, eval_n=2, final_eval_n=6, workers=1,
        threads=1, time_budget=seconds, aux_weight=0.0,
    )  # fmt: skip


def test_time_budget_fits_the_schedule(tmp_path: Path) -> None:
    opts = budget_options(12.0)
    res = train_mini(tmp_path / "m", opts)
    log = res.log
    assert log["replans"] and log["replans"][0]["from"] == 100_000
    assert res.planned_steps < 100_000 and res.steps <= res.planned_steps
    # the cosine horizon was fitted, so the run ends (or is stopped) near the end of the schedule
    assert log["loss_curve"][-1]["lr"] < 0.5 * opts.lr or log["stop_reason"] == "time budget"


def test_time_budget_refits_after_an_evaluation_when_steps_slow_down(tmp_path: Path, monkeypatch) -> None:
    """Steps that get slower after the warm-up (evaluations, a second job on the GPU) leave the warm-up's
    horizon too long; a re-fit after a periodic evaluation shrinks it, so the schedule still ends."""
    import qvlq.mini.train as T

    calls = {"n": 0}
    real = T.training_losses

    def slower_after_warmup(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 40:
            time.sleep(0.03)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "training_losses", slower_after_warmup)
    opts = budget_options(20.0)
    res = train_mini(tmp_path / "m", opts)
    log = res.log
    first, *later = log["replans"]
    assert first["at_step"] < opts.warmup
    late = [r for r in later if r["at_step"] > opts.warmup]
    assert late and late[0]["to"] < late[0]["from"] and late[0]["sec_per_step"] > first["sec_per_step"]
    final = log["loss_curve"][-1]
    assert final["lr"] < 0.5 * opts.lr  # the schedule ended (or nearly): what re-fitting is for
    # completed, or (a loaded machine) stopped by the budget in the last tenth of the re-fitted horizon
    assert log["stop_reason"] == "completed" or final["step"] >= 0.9 * res.planned_steps, (final, res.planned_steps)


def test_refresh_and_frozen_vision_during_training(tmp_path: Path) -> None:
    opts = TrainOptions(
        size="micro", steps=6, batch=2, warmup=2, pool=8, refresh_every=2, refresh_block=4, eval_n=2,
        final_eval_n=6, workers=2, threads=1, vision_freeze=1.0,
    )  # fmt: skip
    res = train_mini(tmp_path / "m", opts)
    data = res.log["data"]
    assert res.steps == 6 and data["refreshes"] == 2 and data["unique_samples"] == 16
    # vision frozen for the whole run: its weights are still the init (the LLM's are not)
    from qvlq.mini.evaluate import load_model

    trained, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="fp16")
    init = init_model(trained.config, seed=0).half().state_dict()
    after = trained.state_dict()
    assert all(torch.equal(after[k], init[k]) for k in after if k.startswith("transformer.visual."))
    assert not torch.equal(after["lm_head.weight"], init["lm_head.weight"])


def test_eval_tasks_cli_json(micro_ckpt: tuple[Path, object]) -> None:
    from qvlq.cli import app

    out, _ = micro_ckpt
    res = CliRunner().invoke(app, ["eval-tasks", str(out), "--n", "12", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["n"] == 12 and "all" in data["scores"] and 0.0 <= data["scores"]["all"]["accuracy"] <= 1.0


def test_eval_tasks_cli_bad_dir(tmp_path: Path) -> None:
    from qvlq.cli import app

    res = CliRunner().invoke(app, ["eval-tasks", str(tmp_path / "nope"), "--n", "2"])
    assert res.exit_code == 2
