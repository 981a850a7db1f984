"""BF16 vs Int4 quality on TouchStone (spec/protocols.md): the same prompts answered by both models
through the chat API, judged by any OpenAI-compatible endpoint and, judge-free, compared token by token.

Data: qvlq.touchstone (the TSV, its items and slices). Judge: qvlq.judge (the pairwise prompt, the scores,
the OpenAI-compatible client); this file runs them over a plan, with caches.

Caches (JSONL under `--cache`, default `<out>/cache`): every process appends to its own part
(`{kind}.{part}.jsonl`, part `main` or `rank{i}-of-{n}`) with one write() per record, and every reader
takes the union of all parts, skipping unparsable lines (a run killed mid-write leaves a truncated last
line; the next writer starts a new line first). Keys: generations by (model fingerprint, item uid,
decoding id); teacher forcing by (both fingerprints, item uid, decoding id, sha256 of the BF16
response); judge rounds by sha256 of (judge model, messages, temperature). A model fingerprint is
sha256 of config.json plus the names and sizes of the index/weight files (cheap: no weights are read).
The judge's API key is only ever sent in the Authorization header: it is not in settings, caches, logs or
reports.

Judge-free metrics are teacher-forced on the BF16 response (re-encoded from its text, without the
closing <|im_end|>, which a response cut at max_new_tokens does not have): both models score the same
prompt + response tokens in one forward each. Per item: mean KL(BF16 || Int4) over response tokens,
top-1 agreement rate, total log-likelihood under each model. Aggregates are means over items with
seeded bootstrap 95% intervals (items resampled; TouchStone scores resample items with all their rounds).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .chat import DEFAULT_SYSTEM, chat, make_context
from .fast import CHAT_ENGINES
from .generate import Sampling
from .grounding import iou, parse_boxes
from .io import sha256_file
from .judge import JudgeRound, OpenAIJudge, ask_judge, judge_messages
from .report import TableSpec, markdown_tables, md_escape, render_rich, save_tables_svg
from .stats import bootstrap_ci
from .touchstone import LANGS, TouchStoneError, TouchStoneItem, load_touchstone, select_items

MODELS = ("bf16", "int4")
ORDERS = ("reference_first", "model_first")
# Published TouchStone scores of Qwen-VL-Chat (protocols.md): the seed's quality table.
SEED_TOUCHSTONE = {"bf16": {"en": 645.2, "zh": 401.2}, "int4": {"en": 651.4, "zh": 386.6}}
PROMPT_VERSION = 1  # bump when the prompt layout changes: it is part of the decoding id (cache key)
MAX_WINDOW = 6144

Progress = Callable[[str, int, int], None]
Loader = Callable[[str], tuple[Any, Any]]


class CompareError(ValueError):
    """Bad input for a comparison, with a one-line reason."""



# ------------------------------------------------------------------------------------------ settings
@dataclass
class CompareSettings:
    bf16: str
    int4: str
    data: str
    category: str | None = None
    task: str | None = None
    lang: str | None = None
    limit: int | None = None
    seed: int = 0
    max_new_tokens: int = 512
    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    system: str = DEFAULT_SYSTEM
    judge: str = "none"
    judge_url: str = "https://api.openai.com/v1"
    judge_model: str = "gpt-4"
    judge_key_env: str = "OPENAI_API_KEY"
    judge_timeout: float = 60.0
    judge_retries: int = 5
    judge_workers: int = 4
    device: str | None = None
    dtype: str = "auto"
    # decode engine (qvlq.fast.engine_for). Not in decoding(): the engines give the same greedy tokens (tested),
    # so a cache filled by one serves the other.
    engine: str = "auto"
    # the Int4 model's kernels (qvlq.int4.BACKENDS). Not in decoding() either: they differ only in the order of
    # fp32 sums, so a cache filled with one serves the others.
    int4_kernel: str = "auto"
    # both models' ViT blocks in host memory (qvlq.model.stream): the same features bit for bit, so not keyed either
    stream_vision: bool = False
    host_embedding: bool = False  # the token table in host memory, read in place: the same values, not keyed
    cache: str | None = None
    out: str | None = None

    def validate(self) -> None:
        if self.judge not in ("none", "openai"):
            raise CompareError(f"--judge must be none or openai, got {self.judge!r}")
        if self.max_new_tokens < 1:
            raise CompareError("--max-new-tokens must be >= 1")
        if self.sample and not (self.temperature > 0 and 0 < self.top_p <= 1):
            raise CompareError("--sample needs --temperature > 0 and 0 < --top-p <= 1")
        if self.engine not in CHAT_ENGINES:
            raise CompareError(f"--engine must be one of {', '.join(CHAT_ENGINES)}, got {self.engine!r}")
        from .int4 import backend_problem
        from .model.loading import resolve_device

        problem = backend_problem(self.int4_kernel, resolve_device(self.device))
        if problem:
            raise CompareError(f"--int4-kernel {problem}")
        if self.judge_retries < 0 or self.judge_workers < 1 or self.judge_timeout <= 0:
            raise CompareError("--judge-retries >= 0, --judge-workers >= 1 and --judge-timeout > 0 are required")

    def decoding(self) -> dict[str, Any]:
        """Everything that changes a generation (the generation cache key's settings part)."""
        d: dict[str, Any] = {
            "prompt_version": PROMPT_VERSION, "system": self.system, "max_new_tokens": self.max_new_tokens,
            "do_sample": self.sample,
        }  # fmt: skip
        if self.sample:
            d.update(temperature=self.temperature, top_p=self.top_p, top_k=0, seed=self.seed)
        return d

    def public(self) -> dict[str, Any]:
        """Settings as reported (no paths of this run's outputs; never the key itself)."""
        d = asdict(self)
        for k in ("cache", "out", "device", "judge_workers"):
            d.pop(k)
        if self.judge == "none":
            for k in list(d):
                if k.startswith("judge_"):
                    d.pop(k)
        return d


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 of config.json + names and sizes of the index/weight files (cheap: no weights read)."""
    d = Path(model_dir)
    cfg = d / "config.json"
    if not cfg.is_file():
        raise CompareError(f"{d}: no config.json (not a model directory)")
    h = hashlib.sha256(cfg.read_bytes())
    for f in sorted(d.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")):
            h.update(f"\n{f.name}\t{f.stat().st_size}".encode())
    return h.hexdigest()


@dataclass
class ComparePlan:
    settings: CompareSettings
    items: list[TouchStoneItem]
    dirs: dict[str, str]  # model -> resolved local directory
    fingerprints: dict[str, str]
    decoding_id: str
    cache_dir: Path
    data_sha256: str

    @property
    def signature(self) -> str:
        """Identifies the work of this run (models, decoding, items): shard markers live under it."""
        return _sha([self.fingerprints, self.decoding_id, [it.uid for it in self.items]])[:16]


def default_out_dir(settings: CompareSettings) -> Path:
    name = f"{Path(settings.bf16).name}-vs-{Path(settings.int4).name}"
    return Path("reports") / "compare" / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run")


def plan_compare(settings: CompareSettings) -> ComparePlan:
    """Validate the inputs (one-line CompareError/OSError on bad ones) and select the items; loads no model."""
    from .model.loading import read_config, resolve_model_dir

    settings.validate()
    items = select_items(
        load_touchstone(settings.data), settings.category, settings.task, settings.lang, settings.limit, settings.seed
    )
    for it in items:  # headers only: a bad picture fails before any model work
        try:
            it.check_images()
        except TouchStoneError as e:
            raise CompareError(f"{settings.data}: {e}") from None
    dirs = {m: str(resolve_model_dir(getattr(settings, m))) for m in MODELS}
    configs = {m: read_config(Path(dirs[m])) for m in MODELS}
    if not configs["int4"].is_quantized:
        raise CompareError(f"{settings.int4}: not a GPTQ checkpoint (config.json has no quantization_config)")
    fps = {m: model_fingerprint(dirs[m]) for m in MODELS}
    out = Path(settings.out) if settings.out else default_out_dir(settings)
    cache = Path(settings.cache) if settings.cache else out / "cache"
    return ComparePlan(
        settings, items, dirs, fps, _sha(settings.decoding())[:16], cache, sha256_file(Path(settings.data))
    )


# ------------------------------------------------------------------------------------------ caches
class JsonlCache:
    """Records of one kind from every part file `{kind}.*.jsonl` in `root` (first record of a key wins);
    `put` appends to this process's part with a single write(), so a kill leaves at most one torn line."""

    def __init__(self, root: Path, kind: str, part: str, key_fields: Sequence[str]) -> None:
        self.root, self.kind, self.key_fields = Path(root), kind, tuple(key_fields)
        self.path = self.root / f"{kind}.{part}.jsonl"
        self.records: dict[tuple, dict[str, Any]] = {}
        self.skipped_lines = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        for p in sorted(self.root.glob(f"{kind}.*.jsonl")):
            for line in p.read_bytes().split(b"\n"):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    self.skipped_lines += 1
                    continue
                if not isinstance(rec, dict) or any(k not in rec for k in self.key_fields):
                    self.skipped_lines += 1
                    continue
                self.records.setdefault(self.key(rec), rec)

    def key(self, rec: dict[str, Any]) -> tuple:
        return tuple(rec[k] for k in self.key_fields)

    def get(self, *key: Any) -> dict[str, Any] | None:
        return self.records.get(tuple(key))

    def put(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode()
        with self._lock:
            if self._fd is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                size = os.fstat(self._fd).st_size
                if size:
                    with open(self.path, "rb") as f:
                        f.seek(size - 1)
                        if f.read(1) != b"\n":  # a torn last line: start ours on a fresh line
                            os.write(self._fd, b"\n")
            os.write(self._fd, line)
            self.records.setdefault(self.key(rec), rec)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


GEN_KEY = ("model", "item", "decoding")
TF_KEY = ("bf16", "int4", "item", "decoding", "response_sha")
JUDGE_KEY = ("key",)


def _sha_text(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def _part_name(rank: int, world: int) -> str:
    return "main" if world == 1 else f"rank{rank}-of-{world}"


# ------------------------------------------------------------------------------------------ models
def item_sampling(settings: CompareSettings, item: TouchStoneItem) -> Sampling:
    """Identical for both models; a sampled run seeds each item from (seed, uid)."""
    if not settings.sample:
        return Sampling(do_sample=False)
    seed = (settings.seed * 1_000_003 + zlib.crc32(item.uid.encode())) % 2**31
    return Sampling(do_sample=True, temperature=settings.temperature, top_k=0, top_p=settings.top_p, seed=seed)


def generate_response(
    model: Any, tokenizer: Any, item: TouchStoneItem, images: list[Image.Image], settings: CompareSettings
) -> str:
    response, _ = chat(
        model, tokenizer, item.query(), history=None, append_history=False, images=images,
        sampling=item_sampling(settings, item), max_new_tokens=settings.max_new_tokens, system=settings.system,
        max_window_size=MAX_WINDOW, engine=settings.engine,
    )  # fmt: skip
    return response


@dataclass
class TeacherForced:
    n_tokens: int
    kl: float | None  # mean over response tokens of KL(BF16 || Int4), nats
    top1: float | None  # share of response positions where both argmaxes agree
    ll_bf16: float | None  # total log-likelihood of the response tokens (nats)
    ll_int4: float | None


@torch.inference_mode()
def _response_logprobs(model: Any, ids: list[int], n: int, images: list[Image.Image]) -> torch.Tensor:
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device), images=images, logits_to_keep=n + 1).logits
    return logits[0, :-1].float().log_softmax(-1).cpu()  # position t predicts token t+1: the n response tokens


def teacher_force(
    bf16: Any, int4: Any, tokenizer: Any, item: TouchStoneItem, images: list[Image.Image], response: str,
    system: str = DEFAULT_SYSTEM,
) -> TeacherForced:  # fmt: skip
    """Both models score the same sequence: the chat prompt + the (BF16) response tokens."""
    _, prompt = make_context(tokenizer, item.query(), None, system, max_window_size=sys.maxsize)
    resp = tokenizer.encode_text(response)
    n = len(resp)
    if n == 0:
        return TeacherForced(0, None, None, None, None)
    ids = prompt + resp
    lp_b = _response_logprobs(bf16, ids, n, images)
    lp_q = lp_b if int4 is bf16 else _response_logprobs(int4, ids, n, images)
    p_b = lp_b.exp()
    kl = torch.where(p_b > 0, p_b * (lp_b - lp_q), torch.zeros_like(p_b)).sum(-1)
    top1 = (lp_b.argmax(-1) == lp_q.argmax(-1)).float()
    tgt = torch.tensor(resp)[:, None]
    return TeacherForced(
        n, float(kl.mean()), float(top1.mean()), float(lp_b.gather(-1, tgt).sum()), float(lp_q.gather(-1, tgt).sum())
    )


def default_loader(
    device: str | None, dtype: str, int4_kernel: str = "auto", stream_vision: bool = False, host_embedding: bool = False
) -> Loader:
    def load(model_dir: str) -> tuple[Any, Any]:
        from .model.loading import load_model_and_tokenizer

        return load_model_and_tokenizer(model_dir, device, dtype, int4_kernel, stream_vision, host_embedding)

    return load


@dataclass
class ShardResult:
    rank: int
    world: int
    items: int
    generated: dict[str, int]  # model -> new generations (cache misses)
    teacher_forced: int
    seconds: float


def _shard_marker(plan: ComparePlan, rank: int, world: int) -> Path:
    run = re.sub(r"[^A-Za-z0-9._-]+", "-", os.environ.get("TORCHELASTIC_RUN_ID", "default"))
    return plan.cache_dir / "shards" / plan.signature / run / f"rank{rank}-of-{world}.json"


def run_shard(
    plan: ComparePlan, rank: int = 0, world: int = 1, loader: Loader | None = None, progress: Progress | None = None
) -> ShardResult:
    """Generate (both models) and teacher-force the items rank::world that the caches lack; models are
    loaded only when something is missing. Ends by writing this shard's marker (or its error)."""
    if not (0 <= rank < world):
        raise CompareError(f"shard {rank}/{world}: need 0 <= i < n")
    from .io import write_json

    t0 = time.perf_counter()
    marker = _shard_marker(plan, rank, world) if world > 1 else None
    if marker is not None:
        marker.unlink(missing_ok=True)
    try:
        result = _run_shard(plan, rank, world, loader, progress)
    except BaseException as e:
        if marker is not None:  # rank 0 fails fast instead of waiting out its timeout
            write_json(marker, {"rank": rank, "world": world, "error": str(e).splitlines()[0] if str(e) else repr(e)})
        raise
    result.seconds = time.perf_counter() - t0
    if marker is not None:
        write_json(marker, {"rank": rank, "world": world, "items": [it.uid for it in plan.items[rank::world]]})
    return result


def _run_shard(
    plan: ComparePlan, rank: int, world: int, loader: Loader | None, progress: Progress | None
) -> ShardResult:
    s, fp, dec = plan.settings, plan.fingerprints, plan.decoding_id
    part = _part_name(rank, world)
    gens = JsonlCache(plan.cache_dir, "generations", part, GEN_KEY)
    tfs = JsonlCache(plan.cache_dir, "teacher_forcing", part, TF_KEY)
    load = loader or default_loader(s.device, s.dtype, s.int4_kernel, s.stream_vision, s.host_embedding)
    loaded: dict[str, tuple[Any, Any]] = {}

    def model(m: str) -> tuple[Any, Any]:
        if m not in loaded:
            other = next((o for o in loaded if fp[o] == fp[m]), None)  # same checkpoint: load once
            loaded[m] = loaded[other] if other else load(plan.dirs[m])
        return loaded[m]

    mine = plan.items[rank::world]
    generated = {m: 0 for m in MODELS}
    n_tf = 0
    try:
        for done, item in enumerate(mine):
            if progress:
                progress("items", done, len(mine))
            images: list[Image.Image] | None = None
            for m in MODELS:
                if gens.get(fp[m], item.uid, dec) is None:
                    images = images or item.pil_images()
                    mdl, tok = model(m)
                    t = time.perf_counter()
                    text = generate_response(mdl, tok, item, images, s)
                    gens.put({
                        "model": fp[m], "item": item.uid, "decoding": dec, "response": text,
                        "n_tokens": len(tok.encode_text(text)), "seconds": round(time.perf_counter() - t, 3),
                    })  # fmt: skip
                    generated[m] += 1
            response = gens.get(fp["bf16"], item.uid, dec)["response"]  # type: ignore[index]
            if tfs.get(fp["bf16"], fp["int4"], item.uid, dec, _sha_text(response)) is None:
                images = images or item.pil_images()
                (mb, tok), (mq, _) = model("bf16"), model("int4")
                t = time.perf_counter()
                r = teacher_force(mb, mq, tok, item, images, response, s.system)
                tfs.put({
                    "bf16": fp["bf16"], "int4": fp["int4"], "item": item.uid, "decoding": dec,
                    "response_sha": _sha_text(response), **asdict(r), "seconds": round(time.perf_counter() - t, 3),
                })  # fmt: skip
                n_tf += 1
        if progress:
            progress("items", len(mine), len(mine))
    finally:
        gens.close()
        tfs.close()
    return ShardResult(rank, world, len(mine), generated, n_tf, 0.0)


def wait_for_shards(
    plan: ComparePlan, world: int, timeout_s: float = 86400.0, poll_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:  # fmt: skip
    """Block until every rank of `world` has written its marker; a rank's error is raised here."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = []
        for r in range(world):
            p = _shard_marker(plan, r, world)
            try:
                m = json.loads(p.read_text())
            except (OSError, ValueError):
                pending.append(r)
                continue
            if "error" in m:
                raise CompareError(f"rank {r} of {world} failed: {m['error']}")
            if m.get("items") != [it.uid for it in plan.items[r::world]]:
                pending.append(r)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise CompareError(f"timed out waiting for rank(s) {', '.join(map(str, pending))} of {world}")
        sleep(poll_s)


# ------------------------------------------------------------------------------------------ judge

def judge_items(
    plan: ComparePlan, responses: dict[str, dict[str, str]], judge: Any, sleep: Callable[[float], None] = time.sleep,
    progress: Progress | None = None, part: str = "main",
) -> dict[str, dict[str, list[JudgeRound]]]:  # fmt: skip
    """uid -> model -> [reference_first round, model_first round]. Successful rounds are cached by
    (judge model, messages); failed ones are not (a rerun tries them again)."""
    s = plan.settings
    cache = JsonlCache(plan.cache_dir, "judge", part, JUDGE_KEY)
    jobs = []
    for it in plan.items:
        for m in MODELS:
            ans = responses[it.uid][m]
            for order in ORDERS:
                pair = (it.reference, ans) if order == "reference_first" else (ans, it.reference)
                jobs.append((it.uid, m, order, judge_messages(it.human_annotation, it.question, *pair)))
    done = [0]
    lock = threading.Lock()

    def run(job: tuple) -> JudgeRound:
        uid, m, order, messages = job
        key = _sha({"judge_model": s.judge_model, "messages": messages, "temperature": 0})
        rec = cache.get(key)
        attempts = 0
        if rec is not None:
            scores, err = tuple(rec["scores"]), None
        else:
            scores, content, err, attempts = ask_judge(judge, messages, s.judge_retries, sleep)
            if scores is not None:
                cache.put({"key": key, "judge_model": s.judge_model, "scores": list(scores), "content": content})
        with lock:
            done[0] += 1
            if progress:
                progress("judge", done[0], len(jobs))
        if scores is None:
            return JudgeRound(order, None, None, err, attempts)
        ref, mod = (scores[0], scores[1]) if order == "reference_first" else (scores[1], scores[0])
        return JudgeRound(order, mod, ref, None, attempts)

    try:
        with ThreadPoolExecutor(max_workers=s.judge_workers) as pool:
            rounds = list(pool.map(run, jobs))
    finally:
        cache.close()
    out: dict[str, dict[str, list[JudgeRound]]] = {}
    for (uid, m, _, _), r in zip(jobs, rounds, strict=True):
        out.setdefault(uid, {}).setdefault(m, []).append(r)
    return out


# ------------------------------------------------------------------------------------------ report
@dataclass
class Metric:
    name: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int


@dataclass
class ScoreCell:
    """TouchStone score (mean model score over valid rounds x 100) with an item-bootstrap 95% CI."""

    score: float | None
    ci_low: float | None
    ci_high: float | None
    n_items: int
    n_rounds: int
    failed_rounds: int
    reference_score: float | None = None  # the GPT-4 reference answer's score in the same rounds (x 100)


@dataclass
class ItemResult:
    uid: str
    index: str
    categories: list[str]
    task_name: str
    lang: str
    n_images: int
    question: str
    responses: dict[str, str]
    tokens: dict[str, int]
    chars: dict[str, int]
    exact_match: bool
    teacher_forced: TeacherForced
    grounding_iou: float | None  # None: neither response holds a box
    judge: dict[str, list[JudgeRound]] = field(default_factory=dict)


@dataclass
class CategoryRow:
    category: str
    n_items: int
    touchstone: dict[str, ScoreCell]  # empty when not judged
    kl: Metric
    top1: Metric
    exact_match: Metric


@dataclass
class CompareReport:
    settings: dict[str, Any]
    models: dict[str, dict[str, str]]
    data: dict[str, Any]
    items: list[ItemResult]
    touchstone: dict[str, dict[str, ScoreCell]]  # model | "delta" -> en | zh | all; empty when not judged
    categories: list[CategoryRow]
    judge_free: list[Metric]
    judge_failures: dict[str, dict[str, Any]]
    notes: list[str]
    seed_reference: dict[str, dict[str, float]] = field(default_factory=lambda: SEED_TOUCHSTONE)
    run: dict[str, Any] = field(default_factory=dict)  # paths, processes, timings: not part of the result


def _metric(name: str, values: Sequence[float]) -> Metric:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return Metric(name, None, None, None, 0)
    lo, hi = bootstrap_ci(v)
    return Metric(name, float(v.mean()), lo, hi, int(v.size))


def _score_cell(items: Sequence[ItemResult], model: str) -> ScoreCell:
    rows, refs, failed = [], [], 0
    for it in items:
        rounds = it.judge.get(model, [])
        valid = [r for r in rounds if r.model_score is not None]
        failed += len(rounds) - len(valid)
        if valid:
            rows.append((sum(r.model_score for r in valid), len(valid)))  # type: ignore[misc]
            refs.append(sum(r.reference_score for r in valid))  # type: ignore[misc]
    if not rows:
        return ScoreCell(None, None, None, 0, 0, failed)
    a = np.asarray(rows, dtype=float)
    lo, hi = bootstrap_ci(a, stat=lambda r: 100 * r[:, 0].sum() / r[:, 1].sum())
    n_rounds = int(a[:, 1].sum())
    score = float(100 * a[:, 0].sum() / n_rounds)
    return ScoreCell(score, lo, hi, len(rows), n_rounds, failed, float(100 * sum(refs) / n_rounds))


def _delta_cell(items: Sequence[ItemResult]) -> ScoreCell:
    """Int4 - BF16 on the items both have valid rounds for, paired bootstrap over items."""
    rows = []
    for it in items:
        sums = []
        for m in MODELS:
            valid = [r.model_score for r in it.judge.get(m, []) if r.model_score is not None]
            sums += [sum(valid), len(valid)]
        if sums[1] and sums[3]:
            rows.append(sums)
    if not rows:
        return ScoreCell(None, None, None, 0, 0, 0)
    a = np.asarray(rows, dtype=float)

    def stat(r: np.ndarray) -> float:
        return 100 * (r[:, 2].sum() / r[:, 3].sum() - r[:, 0].sum() / r[:, 1].sum())

    lo, hi = bootstrap_ci(a, stat=stat)
    return ScoreCell(float(stat(a)), lo, hi, len(rows), int(a[:, 1].sum() + a[:, 3].sum()), 0)


def _judge_free(items: Sequence[ItemResult]) -> list[Metric]:
    tf = [it for it in items if it.teacher_forced.n_tokens > 0]
    ground = [it.grounding_iou for it in items if it.grounding_iou is not None]
    lp = {m: [getattr(it.teacher_forced, f"ll_{m}") / it.teacher_forced.n_tokens for it in tf] for m in MODELS}
    return [
        _metric("kl_bf16_int4_per_token", [it.teacher_forced.kl for it in tf]),  # type: ignore[misc]
        _metric("top1_agreement", [it.teacher_forced.top1 for it in tf]),  # type: ignore[misc]
        _metric("logprob_per_token_bf16", lp["bf16"]),
        _metric("logprob_per_token_int4", lp["int4"]),
        _metric("logprob_per_token_delta", [q - b for b, q in zip(lp["bf16"], lp["int4"], strict=True)]),
        _metric("exact_match", [float(it.exact_match) for it in items]),
        *(_metric(f"tokens_{m}", [it.tokens[m] for it in items]) for m in MODELS),
        *(_metric(f"chars_{m}", [it.chars[m] for it in items]) for m in MODELS),
        _metric("grounding_iou", ground),
    ]


def _first_box_iou(a: str, b: str) -> float | None:
    ba, bb = parse_boxes(a), parse_boxes(b)
    if not ba and not bb:
        return None
    if not ba or not bb:
        return 0.0  # one model grounded, the other did not
    return iou(ba[0].box, bb[0].box)


def collect(
    plan: ComparePlan, judge: Any | None = None, progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> CompareReport:  # fmt: skip
    """The report from the caches alone (every shard must be complete); judges when a judge is given.
    A single-process run and a merge of shards go through here, so their results are identical."""
    t0 = time.perf_counter()
    fp, dec = plan.fingerprints, plan.decoding_id
    gens = JsonlCache(plan.cache_dir, "generations", "main", GEN_KEY)
    tfs = JsonlCache(plan.cache_dir, "teacher_forcing", "main", TF_KEY)
    missing = [
        it.index for it in plan.items
        if any(gens.get(fp[m], it.uid, dec) is None for m in MODELS)
        or tfs.get(fp["bf16"], fp["int4"], it.uid, dec, _sha_text(gens.get(fp["bf16"], it.uid, dec)["response"]))
        is None
    ]  # fmt: skip
    if missing:
        raise CompareError(
            f"{len(missing)} of {len(plan.items)} items have no cached results in {plan.cache_dir} "
            f"(e.g. index {missing[0]}): run the missing shards first"
        )
    items: list[ItemResult] = []
    gen_seconds = {m: 0.0 for m in MODELS}
    tf_seconds = 0.0
    for it in plan.items:
        g = {m: gens.get(fp[m], it.uid, dec) for m in MODELS}
        resp = {m: g[m]["response"] for m in MODELS}  # type: ignore[index]
        t = tfs.get(fp["bf16"], fp["int4"], it.uid, dec, _sha_text(resp["bf16"]))
        for m in MODELS:
            gen_seconds[m] += float(g[m].get("seconds", 0.0))  # type: ignore[union-attr]
        tf_seconds += float(t.get("seconds", 0.0))  # type: ignore[union-attr]
        items.append(ItemResult(
            it.uid, it.index, list(it.categories), it.task_name, it.lang, len(it.images), it.question, resp,
            {m: int(g[m]["n_tokens"]) for m in MODELS}, {m: len(resp[m]) for m in MODELS},  # type: ignore[index]
            resp["bf16"] == resp["int4"],
            TeacherForced(**{k: t[k] for k in ("n_tokens", "kl", "top1", "ll_bf16", "ll_int4")}),  # type: ignore[index]
            _first_box_iou(resp["bf16"], resp["int4"]),
        ))  # fmt: skip
    t_judge = time.perf_counter()
    if judge is not None:
        rounds = judge_items(plan, {i.uid: i.responses for i in items}, judge, sleep, progress)
        for i in items:
            i.judge = rounds[i.uid]
    judge_s = time.perf_counter() - t_judge

    touchstone: dict[str, dict[str, ScoreCell]] = {}
    failures: dict[str, dict[str, Any]] = {}
    if judge is not None:
        groups = {"en": [i for i in items if i.lang == "en"], "zh": [i for i in items if i.lang == "zh"], "all": items}
        for m in MODELS:
            touchstone[m] = {k: _score_cell(g, m) for k, g in groups.items()}
            kinds: dict[str, int] = {}
            for i in items:
                for r in i.judge.get(m, []):
                    if r.error:
                        kinds[r.error] = kinds.get(r.error, 0) + 1
            failures[m] = {"failed_rounds": sum(kinds.values()), "rounds": 2 * len(items), "by_kind": kinds,
                           "calls": sum(r.attempts for i in items for r in i.judge.get(m, []))}  # fmt: skip
        touchstone["delta"] = {k: _delta_cell(g) for k, g in groups.items()}
    cats = list(dict.fromkeys(c for i in items for c in i.categories))
    rows = []
    for c in cats:
        sel = [i for i in items if c in i.categories]
        tf = [i.teacher_forced for i in sel if i.teacher_forced.n_tokens > 0]
        rows.append(CategoryRow(
            c, len(sel), {m: _score_cell(sel, m) for m in MODELS} if judge is not None else {},
            _metric("kl_bf16_int4_per_token", [t.kl for t in tf]),  # type: ignore[misc]
            _metric("top1_agreement", [t.top1 for t in tf]),  # type: ignore[misc]
            _metric("exact_match", [float(i.exact_match) for i in sel]),
        ))  # fmt: skip
    s = plan.settings
    notes = [
        "TouchStone: each item judged twice per model (reference answer first, then model first); score = mean "
        "model score over valid rounds x 100; failed rounds (after retries) excluded and counted.",
        "Judge-free: teacher-forced on the BF16 response (same tokens for both models); means over items with "
        "item-bootstrap 95% CIs; language zh = question holds a Han ideograph.",
        f"Decoding: {'sampled (seeded per item)' if s.sample else 'greedy'}, max_new_tokens {s.max_new_tokens}, "
        "identical for both models.",
    ]
    if judge is None:
        notes.append("Not judged (--judge none): TouchStone scores need an OpenAI-compatible judge.")
    elif getattr(judge, "has_key", True) is False:
        notes.append(f"No API key in ${s.judge_key_env}: judge requests were sent without Authorization.")
    skipped = gens.skipped_lines + tfs.skipped_lines
    if skipped:
        notes.append(f"{skipped} unreadable cache line(s) skipped (an interrupted run); their items were redone.")
    return CompareReport(
        settings=s.public(),
        models={m: {"dir": getattr(s, m), "fingerprint": fp[m]} for m in MODELS},
        data={"path": s.data, "sha256": plan.data_sha256, "items": len(items),
              "langs": {lang: sum(i.lang == lang for i in items) for lang in LANGS}},  # fmt: skip
        items=items, touchstone=touchstone, categories=rows, judge_free=_judge_free(items),
        judge_failures=failures, notes=notes,
        run={"cache": str(plan.cache_dir), "timings": {
            "generation_s": {m: round(v, 3) for m, v in gen_seconds.items()}, "teacher_forcing_s": round(tf_seconds, 3),
            "judge_s": round(judge_s, 3), "collect_s": round(time.perf_counter() - t0, 3)}},
    )  # fmt: skip


@dataclass
class CompareRun:
    shard: ShardResult | None
    report: CompareReport | None  # None on ranks other than 0 and for a --shard run


def distributed_env(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(rank, world) from torchrun's RANK / WORLD_SIZE; (0, 1) when absent."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        raise CompareError("RANK and WORLD_SIZE must be integers") from None
    if world < 1 or not 0 <= rank < world:
        raise CompareError(f"bad RANK={rank} / WORLD_SIZE={world}")
    return rank, world


def parse_shard(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise CompareError(f"--shard takes i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


def run_compare(
    settings: CompareSettings,
    *,
    shard: tuple[int, int] | None = None,
    merge_only: bool = False,
    env: dict[str, str] | None = None,
    loader: Loader | None = None,
    judge: Any | None = None,
    progress: Progress | None = None,
    wait_timeout_s: float = 86400.0,
    sleep: Callable[[float], None] = time.sleep,
) -> CompareRun:
    """One process (default), one explicit shard (`shard=(i, n)`: no report), a merge of finished shards
    (`merge_only`), or a torchrun rank (RANK/WORLD_SIZE in `env`): every rank does its share, rank 0
    waits for the others' markers and writes the report from the shared caches."""
    plan = plan_compare(settings)
    if judge is None and settings.judge == "openai":
        judge = OpenAIJudge.from_settings(settings)  # used only where a report is made
    t0 = time.perf_counter()
    if merge_only:
        report = collect(plan, judge, progress, sleep)
        report.run["processes"] = "merge"
        return CompareRun(None, report)
    if shard is not None:
        return CompareRun(run_shard(plan, shard[0], shard[1], loader, progress), None)
    rank, world = distributed_env(env)
    res = run_shard(plan, rank, world, loader, progress)
    if rank != 0:
        return CompareRun(res, None)
    if world > 1:
        wait_for_shards(plan, world, wait_timeout_s, sleep=sleep)
    report = collect(plan, judge, progress, sleep)
    report.run.update(processes=world, wall_s=round(time.perf_counter() - t0, 3))
    return CompareRun(res, report)


# ------------------------------------------------------------------------------------------ rendering
def _num(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def _cell_text(c: ScoreCell | None) -> str:
    if c is None or c.score is None:
        return "n/a" if c is None or not c.failed_rounds else f"n/a ({c.failed_rounds} failed)"
    fail = f", {c.failed_rounds} failed" if c.failed_rounds else ""
    return f"{c.score:.1f} [{c.ci_low:.1f}, {c.ci_high:.1f}] (n={c.n_items}{fail})"


def _metric_text(m: Metric, nd: int = 3, pct: bool = False) -> str:
    if m.value is None:
        return "n/a"
    if pct:
        return f"{100 * m.value:.1f}% [{100 * m.ci_low:.1f}, {100 * m.ci_high:.1f}]"  # type: ignore[operator]
    spec = f".{nd}g" if abs(m.value) < 0.01 and m.value != 0 else f".{nd}f"  # tiny KLs keep their digits
    return f"{m.value:{spec}} [{m.ci_low:{spec}}, {m.ci_high:{spec}}]"


METRIC_LABELS = {
    "kl_bf16_int4_per_token": ("KL(BF16 || Int4) per token (nats)", 4, False),
    "top1_agreement": ("top-1 agreement", 1, True),
    "logprob_per_token_bf16": ("log-prob per token, BF16", 3, False),
    "logprob_per_token_int4": ("log-prob per token, Int4", 3, False),
    "logprob_per_token_delta": ("log-prob per token, Int4 - BF16", 4, False),
    "exact_match": ("exact match BF16 = Int4", 1, True),
    "tokens_bf16": ("response tokens, BF16", 1, False),
    "tokens_int4": ("response tokens, Int4", 1, False),
    "chars_bf16": ("response chars, BF16", 1, False),
    "chars_int4": ("response chars, Int4", 1, False),
    "grounding_iou": ("grounding IoU of first boxes (items with a box)", 3, False),
}


def report_tables(report: CompareReport) -> list[TableSpec]:
    judged = bool(report.touchstone)
    judge_name = report.settings.get("judge_model", "")
    cols = ["model", "EN", "ZH", "All"]
    rows = []
    for m, label in (("bf16", "BF16"), ("int4", "Int4"), ("delta", "Int4 - BF16")):
        if judged:
            rows.append([label] + [_cell_text(report.touchstone[m].get(k)) for k in ("en", "zh", "all")])
        elif m != "delta":
            rows.append([label, "not judged", "not judged", "not judged"])
    for m, label in (("bf16", "BF16 (seed, published)"), ("int4", "Int4 (seed, published)")):
        ref = report.seed_reference[m]
        rows.append([label, f"{ref['en']:.1f}", f"{ref['zh']:.1f}", "-"])
    quality = TableSpec(
        f"TouchStone score ({'judge ' + judge_name if judged else 'no judge'})", cols, rows,
        "score x100 of the mean 1-10 rating, [bootstrap 95% CI], n items. Seed rows: the Qwen-VL README (full set).",
    )  # fmt: skip
    cat_cols = ["category", "n"] + (["BF16", "Int4"] if judged else []) + ["KL/token", "top-1 agree", "exact match"]
    cat_rows = []
    for c in report.categories:
        row = [c.category, str(c.n_items)]
        if judged:
            row += [_cell_text(c.touchstone.get(m)) for m in MODELS]
        row += [_metric_text(c.kl, 4), _metric_text(c.top1, pct=True), _metric_text(c.exact_match, pct=True)]
        cat_rows.append(row)
    per_cat = TableSpec("Per category (an item counts in each of its categories)", cat_cols, cat_rows)
    jf = TableSpec(
        "Judge-free (teacher-forced on the BF16 response)", ["metric", "value [95% CI]", "n"],
        [[METRIC_LABELS.get(m.name, (m.name, 3, False))[0],
          _metric_text(m, *METRIC_LABELS.get(m.name, (m.name, 3, False))[1:]), str(m.n)] for m in report.judge_free],
    )  # fmt: skip
    tables = [quality, per_cat, jf]
    if judged:
        tables.append(TableSpec(
            "Judge rounds", ["model", "rounds", "failed (excluded)", "failures by kind", "calls this run"],
            [[m, str(f["rounds"]), str(f["failed_rounds"]),
              ", ".join(f"{k} x{v}" for k, v in sorted(f["by_kind"].items())) or "-", str(f["calls"])]
             for m, f in report.judge_failures.items()],
        ))  # fmt: skip
    s = report.settings
    slice_ = ", ".join(f"{k} {s[k]}" for k in ("category", "task", "lang", "limit") if s.get(k) is not None) or "all"
    tables.append(TableSpec("Run", ["", ""], [
        ["data", f"{report.data['path']} ({report.data['items']} items: EN {report.data['langs']['en']}, "
                 f"ZH {report.data['langs']['zh']}; slice: {slice_}, seed {s['seed']})"],
        *([m, f"{v['dir']} ({v['fingerprint'][:12]})"] for m, v in report.models.items()),
        ["decoding", (f"sampled: temperature {s['temperature']}, top_p {s['top_p']}, seed {s['seed']}" if s["sample"]
                      else "greedy") + f"; max_new_tokens {s['max_new_tokens']}; dtype {s['dtype']}"],
        ["judge", f"{s['judge_model']} at {s['judge_url']} (key from ${s['judge_key_env']})" if judged else "none"],
    ]))  # fmt: skip
    return tables


def render_markdown(report: CompareReport, tables: list[TableSpec] | None = None) -> str:
    tables = tables if tables is not None else report_tables(report)
    lines = [f"# qvlq compare: {Path(report.models['bf16']['dir']).name} vs {Path(report.models['int4']['dir']).name}",
             ""] + [f"- {md_escape(n)}" for n in report.notes] + [""]  # fmt: skip
    return "\n".join(lines + markdown_tables(tables))


def report_json(report: CompareReport) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(report), default=str))


def write_report(report: CompareReport, out: str | os.PathLike) -> Path:
    """report.json, report.md and report.svg in `out`, each written atomically (the directory itself is
    kept: the default cache lives in it)."""
    from .io import atomic_write_text

    out = Path(out)
    tables = report_tables(report)
    atomic_write_text(out / "report.json", json.dumps(report_json(report), indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "report.md", render_markdown(report, tables))
    save_tables_svg(out / "report.svg", tables, report.notes, title="qvlq compare")
    return out


def rich_tables(report: CompareReport) -> list[Any]:
    return render_rich(report_tables(report))


def out_dir(settings: CompareSettings) -> Path:
    return Path(settings.out) if settings.out else default_out_dir(settings)


__all__ = [
    "CompareError", "CompareReport", "CompareRun", "CompareSettings", "ComparePlan", "JsonlCache", "Metric",
    "ScoreCell", "ShardResult", "collect", "distributed_env", "model_fingerprint", "parse_shard", "plan_compare",
    "render_markdown", "report_json", "report_tables", "run_compare", "run_shard", "teacher_force", "wait_for_shards",
    "write_report",
]  # fmt: skip
