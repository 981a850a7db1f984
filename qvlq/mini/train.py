"""Training qvlq-mini: a small Qwen-VL-Chat taught the synthetic task suite, written in the official layout.

Data: ``train``-split samples are rendered (scene, resize to the model's image size, tokens) by
forked worker processes into shared host buffers and copied once into a pool that lives on the
training device; every step draws a task-weighted batch from it, so no PIL or tokenizer work
happens in the loop. Every ``refresh_every`` steps a freshly rendered block of unseen samples
replaces the oldest rows (rendered in the background while training runs; the swap points are
step-based, so the data order depends only on the seed). Each sample is rendered exactly the way
:func:`qvlq.chat.chat` prompts at inference (:func:`render_sample`): the ``make_context`` tokens of
``Picture 1: <img>...</img>\\n{question}`` plus the answer tokens and ``<|im_end|>``; the language
model loss covers only those answer tokens.

Vision from scratch needs two things here (both measured on CPU runs; see the functions):
:func:`local_resampler_init` starts the resampler as local pooling (with the usual random init all
64 image features are the same background average, <1% apart between pictures), and an auxiliary
per-cell loss (:func:`training_losses`: what lies under each query's cell, and that object's box)
keeps the vision tower informative. Trained on the answer loss alone, the tower collapses to
content-free features while the LLM is still fitting answer priors and never recovers: every task
stays at its prior answer. The auxiliary head is not part of the model and is never saved.

Optimisation: AdamW, linear warmup then cosine decay (to ``min_lr_ratio * lr``), gradient clipping,
bf16 autocast on CUDA. With a ``time_budget`` the cosine horizon is shortened during warmup to what
the measured step rate allows (so the schedule still ends at a low learning rate), again after each
periodic evaluation and every tenth of the plan if the steps got slower (shrinking only), and training
stops early in any case when the budget runs out; the checkpoint is valid either way and
``train_log.json`` records what happened. At the end the fp16 checkpoint is reloaded with
``from_pretrained`` and scored on the held-out ``eval`` split, so the logged accuracy is that of
the files as written.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from qvlq.image import CLIP_MEAN, CLIP_STD
from qvlq.io import OutputExistsError, atomic_dir, write_json, write_shards
from qvlq.tokenizer import VOCAB_FILE, QWenTokenizer, write_tiktoken_ranks

from .evaluate import evaluate_tasks, prompt_ids
from .model import SIZES, MiniSize, mini_config
from .tasks import PALETTE, SHAPE_KINDS, WORDS, Scene, Task, generate_sample, generate_suite
from .vocab import build_vocab

GENERATION_CONFIG = {
    "chat_format": "chatml",
    "do_sample": False,
    "max_new_tokens": 64,
}


# ---------------------------------------------------------------------------------------------
# Rendering


def render_sample(tokenizer: QWenTokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): chat()'s prompt for the question about one picture, then the answer
    tokens and ``<|im_end|>``; labels are -100 everywhere but those answer tokens."""
    prompt = prompt_ids(tokenizer, question)
    target = tokenizer.encode_text(answer) + [tokenizer.im_end_id]
    return prompt + target, [-100] * len(prompt) + target


def image_slot(tokenizer: QWenTokenizer) -> int:
    """Index of the first image-feature slot (just after ``<img>``): the prompt prefix up to the
    picture is the same for every question, so all samples share it."""
    ids = prompt_ids(tokenizer, "?")
    return ids.index(tokenizer.img_start_id) + 1


# ---------------------------------------------------------------------------------------------
# The data pool

TASKS: tuple[Task, ...] = tuple(Task)
_STATE: dict[str, Any] = {}  # shared buffers + tokenizer, inherited by forked render workers
_CACHE: dict[str, list[int]] = {}  # per-process token cache (prompts and answers repeat a lot)


@dataclass
class Buffers:
    """One block of rendered samples: arrays in (shared) host memory, written by the workers."""

    images: np.ndarray  # uint8 [n, S, S, 3]
    ids: np.ndarray  # int32 [n, L], right-padded with <|endoftext|>
    labels: np.ndarray  # int32 [n, L], -100 outside the answers
    lengths: np.ndarray  # int32 [n]
    tasks: np.ndarray  # int8 [n], index into TASKS
    cells: np.ndarray  # int8 [n, grid * grid], auxiliary targets (see cell_labels)
    boxes: np.ndarray  # float32 [n, grid * grid, 4], the labelled object's box / image size

    @classmethod
    def allocate(cls, n: int, image_size: int, max_len: int, n_cells: int = 1) -> Buffers:
        def shared(shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
            return torch.zeros(shape, dtype=dtype).share_memory_().numpy()

        return cls(
            shared((n, image_size, image_size, 3), torch.uint8), shared((n, max_len), torch.int32),
            shared((n, max_len), torch.int32), shared((n,), torch.int32), shared((n,), torch.int8),
            shared((n, n_cells), torch.int8), shared((n, n_cells, 4), torch.float32),
        )  # fmt: skip


N_CELL_CLASSES = 1 + len(PALETTE) * len(SHAPE_KINDS) + len(WORDS)  # background, colour x kind, word


def cell_labels(scene: Scene, grid: int, min_cover: float = 0.3) -> np.ndarray:
    return cell_targets(scene, grid, min_cover)[0]


def cell_targets(scene: Scene, grid: int, min_cover: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """What each cell of a ``grid`` x ``grid`` split of the picture shows: 0 background,
    ``1 + colour * kinds + kind`` for a shape, ``1 + colours * kinds + word index`` for the word.
    A cell takes the object whose box covers at least ``min_cover`` of it (the largest cover wins),
    and every object labels at least the cell holding its centre. Targets of the auxiliary vision
    loss, one per resampler query (row-major, as the queries)."""
    colours, kinds = list(PALETTE), list(SHAPE_KINDS)
    objects = [(s.bbox, 1 + colours.index(s.color) * len(kinds) + kinds.index(s.kind)) for s in scene.shapes]
    if scene.text is not None:
        objects.append((scene.text.bbox, 1 + len(colours) * len(kinds) + WORDS.index(scene.text.text)))
    cw, ch = scene.width / grid, scene.height / grid
    edges_x, edges_y = np.arange(grid + 1) * cw, np.arange(grid + 1) * ch
    best = np.zeros((grid, grid))
    out = np.zeros((grid, grid), dtype=np.int8)
    boxes = np.zeros((grid, grid, 4), dtype=np.float32)
    for (x1, y1, x2, y2), label in objects:
        # inclusive pixel corners -> [x1, x2 + 1) spans; cover = overlap area / cell area
        ox = np.clip(np.minimum(edges_x[1:], x2 + 1) - np.maximum(edges_x[:-1], x1), 0, None) / cw
        oy = np.clip(np.minimum(edges_y[1:], y2 + 1) - np.maximum(edges_y[:-1], y1), 0, None) / ch
        cover = oy[:, None] * ox[None, :]
        r = min(grid - 1, int((y1 + y2 + 1) / 2 / ch))
        c = min(grid - 1, int((x1 + x2 + 1) / 2 / cw))
        cover[r, c] = max(cover[r, c], 1.0)
        take = (cover >= min_cover) & (cover > best)
        out[take] = label
        boxes[take] = (x1 / scene.width, y1 / scene.height, (x2 + 1) / scene.width, (y2 + 1) / scene.height)
        best = np.where(take, cover, best)
    return out.reshape(-1), boxes.reshape(-1, 4)


def _encode_cached(key: str, make: Callable[[], list[int]]) -> list[int]:
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def _render_into(job: tuple[str, int, int, int, int, int]) -> int:
    """Render train samples start..stop-1 into buffer ``name`` from row ``offset``; returns the
    longest sequence written."""
    name, offset, start, stop, seed, size = job
    buf: Buffers = _STATE[name]
    tok: QWenTokenizer = _STATE["tokenizer"]
    longest = 0
    for i in range(start, stop):
        s = generate_sample(i, seed, "train")
        img = s.image if isinstance(s.image, Image.Image) else s.load_image()
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)  # as qvlq.image.preprocess
        prompt = _encode_cached("q:" + s.question, lambda s=s: prompt_ids(tok, s.question))
        target = _encode_cached("a:" + s.answer, lambda s=s: tok.encode_text(s.answer) + [tok.im_end_id])
        n = len(prompt) + len(target)
        if n > buf.ids.shape[1]:
            raise RuntimeError(f"training sample {i} has {n} tokens, more than the pool's {buf.ids.shape[1]}")
        r = offset + i - start
        buf.images[r] = np.asarray(img.convert("RGB"), dtype=np.uint8)
        buf.ids[r] = tok.eod_id
        buf.ids[r, : len(prompt)] = prompt
        buf.ids[r, len(prompt) : n] = target
        buf.labels[r] = -100
        buf.labels[r, len(prompt) : n] = target
        buf.lengths[r] = n
        buf.tasks[r] = TASKS.index(s.task)
        if buf.cells.shape[1] > 1:
            buf.cells[r], buf.boxes[r] = cell_targets(s.scene, math.isqrt(buf.cells.shape[1]))
        longest = max(longest, n)
    return longest


class Renderer:
    """Renders blocks of training samples into named shared buffers, in forked worker processes
    (``workers > 1``, created before any CUDA work) or inline."""

    CHUNK = 256

    def __init__(self, tokenizer: QWenTokenizer, seed: int, image_size: int, buffers: dict[str, Buffers],
                 workers: int) -> None:  # fmt: skip
        self.seed, self.size = seed, image_size
        _STATE.clear()
        _CACHE.clear()  # token ids depend on the tokenizer (image_span); workers fork with it empty
        _STATE.update(buffers, tokenizer=tokenizer)
        self.buffers = buffers
        self.pool = None
        if workers > 1 and "fork" in mp.get_all_start_methods():
            self.pool = mp.get_context("fork").Pool(workers)

    def submit(self, name: str, start: int, n: int) -> Any:
        """Render train indices start..start+n-1 into buffer ``name``; returns a handle for wait()."""
        jobs = [(name, a - start, a, min(start + n, a + self.CHUNK), self.seed, self.size)
                for a in range(start, start + n, self.CHUNK)]  # fmt: skip
        if self.pool is None:
            return [_render_into(j) for j in jobs]
        return self.pool.map_async(_render_into, jobs, chunksize=1)

    @staticmethod
    def wait(handle: Any) -> int:
        return max(handle if isinstance(handle, list) else handle.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None
        _STATE.clear()
        _CACHE.clear()


@dataclass
class Pool:
    """Training samples on the training device (images, ids, labels) plus CPU copies of what the
    sampler needs (lengths, tasks)."""

    images: torch.Tensor  # uint8 [N, S, S, 3]
    ids: torch.Tensor  # int32 [N, L]
    labels: torch.Tensor  # int32 [N, L]
    lengths: torch.Tensor  # int64 [N], CPU
    task_codes: np.ndarray  # int8 [N]
    cells: torch.Tensor  # int8 [N, n_cells] (on the device)
    boxes: torch.Tensor  # float32 [N, n_cells, 4] (on the device)

    def __len__(self) -> int:
        return len(self.task_codes)

    @property
    def tasks(self) -> list[Task]:
        return [TASKS[c] for c in self.task_codes]

    @classmethod
    def from_buffers(cls, buf: Buffers, device: torch.device) -> Pool:
        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(a).to(device)  # on CPU: the (shared) buffer itself

        return cls(t(buf.images), t(buf.ids), t(buf.labels), torch.from_numpy(buf.lengths.astype(np.int64)),
                   buf.tasks.copy(), t(buf.cells), t(buf.boxes))  # fmt: skip

    def replace(self, start: int, buf: Buffers) -> None:
        """Overwrite rows start..start+len(buf)-1 with a freshly rendered block."""
        n = len(buf.tasks)
        rows = slice(start, start + n)
        self.images[rows].copy_(torch.from_numpy(buf.images))
        self.ids[rows].copy_(torch.from_numpy(buf.ids))
        self.labels[rows].copy_(torch.from_numpy(buf.labels))
        self.lengths[rows] = torch.from_numpy(buf.lengths.astype(np.int64))
        self.task_codes[rows] = buf.tasks
        self.cells[rows].copy_(torch.from_numpy(buf.cells))
        self.boxes[rows].copy_(torch.from_numpy(buf.boxes))

    def sampling_weights(self, task_weights: dict[str, float]) -> torch.Tensor:
        """Per-row probabilities giving each task the share ``task_weights`` asks for (default 1)."""
        counts = np.bincount(self.task_codes, minlength=len(TASKS)).astype(np.float64)
        tw = np.array([float(task_weights.get(t.value, 1.0)) for t in TASKS])
        w = tw[self.task_codes] / np.maximum(counts, 1)[self.task_codes]
        return torch.from_numpy(w)


def max_sample_len(n_queries: int) -> int:
    """Room per pool row: the picture span plus generous room for the chat frame, question and answer."""
    return n_queries + 2 + 126


def build_pool(
    tokenizer: QWenTokenizer, n: int, seed: int, image_size: int, workers: int = 0, device: str = "cpu"
) -> Pool:
    """Render ``n`` training samples (indices 0..n-1 of split ``train``) into a :class:`Pool`."""
    buf = Buffers.allocate(n, image_size, max_sample_len(tokenizer.image_span), tokenizer.image_span)
    renderer = Renderer(tokenizer, seed, image_size, {"pool": buf}, workers)
    try:
        renderer.wait(renderer.submit("pool", 0, n))
    finally:
        renderer.close()
    return Pool.from_buffers(buf, torch.device(device))


# ---------------------------------------------------------------------------------------------
# Options and schedule


@dataclass
class TrainOptions:
    steps: int = 30000  # the cosine horizon; with a time budget, shrunk to what fits (see fit_schedule)
    batch: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 300
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    # Optional stage-1 style start: the vision tower frozen, then ramped in (off by default: the
    # auxiliary cell loss below keeps the tower's features informative from the first step instead).
    vision_freeze: float = 0.0  # fraction of the planned steps with the vision tower frozen
    vision_ramp: float = 0.0  # then its LR factor ramps 0 -> 1 over this fraction
    aux_weight: float = 0.5  # weight of the auxiliary per-cell vision loss (0: answer loss only)
    aux_background: float = 0.25  # class weight of background cells in it (they are ~80% of cells)
    aux_box_weight: float = 2.0  # weight of the per-cell box regression inside the auxiliary loss
    seed: int = 0
    size: str = "mini"
    pool: int | None = None  # samples resident on the device (default: 32768 on CUDA, <= 12288 on CPU)
    refresh_every: int | None = None  # steps between fresh blocks (default: 300 with workers, else off)
    refresh_block: int = 4096  # fresh samples per refresh (they replace the oldest pool rows)
    n_ranks: int = 4000  # vocab cap (the corpus gives ~1.7k)
    task_weights: dict[str, float] = field(default_factory=lambda: {"ground": 1.5, "ocr": 1.25})
    eval_every: int | None = None  # default: 2 evaluations during the run (then the final one)
    eval_n: int = 120  # samples per periodic evaluation
    final_eval_n: int = 300
    log_every: int = 25
    time_budget: float | None = None  # seconds for the whole run (data, training, final eval, writing)
    fit_schedule: bool = True  # shrink the cosine horizon to the budget (decided during warmup)
    device: str = "auto"
    workers: int | None = None  # rendering processes (default: cores - 1, at most 12; 1 = inline)
    deterministic: bool = True
    threads: int | None = None  # CPU threads for torch (1 is fastest on a machine busy with other work)


def lr_at(step: int, opts: TrainOptions, planned: int) -> float:
    """Linear warmup to opts.lr, then cosine to min_lr_ratio * lr at ``planned`` steps."""
    warm = max(1, min(opts.warmup, planned // 2))
    if step < warm:
        return opts.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, planned - warm))
    floor = opts.lr * opts.min_lr_ratio
    return floor + (opts.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def vision_lr_factor(step: int, opts: TrainOptions, planned: int) -> float:
    """LR factor of the vision tower: 0 (frozen) for the first ``vision_freeze`` of the run, then a
    linear ramp to 1 over the next ``vision_ramp`` (fractions of the planned steps)."""
    start = int(opts.vision_freeze * planned)
    ramp = max(1, int(opts.vision_ramp * planned))
    if step < start:
        return 0.0
    return min(1.0, (step - start + 1) / ramp)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------------
# Model init and the training forward


def init_model(config: Any, seed: int) -> torch.nn.Module:
    """A fresh QWenLMHeadModel: each tensor drawn by qvlq.checkpoint.init_tensor (seeded by name),
    then the resampler's attention set up local (:func:`local_resampler_init`)."""
    from qvlq.checkpoint import init_tensor
    from qvlq.model.modeling import QWenLMHeadModel

    torch.manual_seed(seed)
    model = QWenLMHeadModel(config)
    with torch.no_grad():
        for name, p in model.state_dict().items():
            p.copy_(init_tensor(name, tuple(p.shape), config, seed))
    local_resampler_init(model.transformer.visual.attn_pool)
    return model


LOCAL_INIT = {"alpha": 6.0, "freqs": 12, "ln_q": 0.1, "ln_kv": 0.25}


@torch.no_grad()
def local_resampler_init(attn_pool: torch.nn.Module, alpha: float = 6.0, freqs: int = 12, ln_q: float = 0.1,
                         ln_kv: float = 0.25) -> None:  # fmt: skip
    """Start the resampler as local pooling: query q attends to the patches at its own grid cell.

    With the usual random init its cross-attention is nearly uniform, so every query returns the
    same background-dominated average: the image features then differ by <1% between images and the
    LLM, seeing a constant picture, settles on the answer prior (measured: the features collapse and
    accuracy stays at chance). Here W_q = W_k = ``alpha`` x a selection of the ``freqs`` fastest
    sin-cos pairs of both axes of the 2-D position table (spread over the heads, so every head sees
    rows and columns), and ``ln_q``/``ln_kv`` start small so the random query and the patch content
    perturb the scores only a little: the score then peaks where query and key positions coincide
    (~70% of the weight on the own cell for the mini geometry). Only the initial values change; the
    architecture and the parameter names are Qwen-VL's. W_v, the query and everything else keep the
    random init, and training is free to move all of it.
    """
    d = attn_pool.attn.embed_dim
    heads = attn_pool.attn.num_heads
    quarter = d // 4  # the table is [column sin | column cos | row sin | row cos], d/4 frequencies each
    k_max = min(freqs, quarter)
    w = torch.zeros(d, d)
    filled = [0] * heads
    per_head = d // heads
    for k in range(k_max):
        h = k % heads
        for base in (0, quarter, 2 * quarter, 3 * quarter):
            w[h * per_head + filled[h], base + k] = alpha
            filled[h] += 1
    proj = attn_pool.attn.in_proj_weight
    proj[:d] = w.to(proj)
    proj[d : 2 * d] = w.to(proj)
    attn_pool.ln_q.weight.fill_(ln_q)
    attn_pool.ln_kv.weight.fill_(ln_kv)


def batch_loss(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor, slot: int
) -> torch.Tensor:
    """Answer-token loss with the image features written over every row's image span.

    Same result as ``model(ids, images=pixels, labels=labels).loss`` (every row holds one picture
    at the same offset), with one concatenation instead of a per-image copy loop.
    """
    return training_losses(model, ids, labels, pixels, slot)[0]


def training_losses(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, pixels: torch.Tensor, slot: int,
    aux_head: torch.nn.Module | None = None, cells: torch.Tensor | None = None,
    cell_weights: torch.Tensor | None = None, boxes: torch.Tensor | None = None, box_weight: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(answer-token LM loss, auxiliary cell loss or None).

    The auxiliary loss classifies what lies under each resampler query's grid cell (:func:`cell_targets`)
    and, for cells on an object, regresses that object's box (L1 on coordinates / image size, weighted
    ``box_weight``), from the image features the LLM receives, through a linear ``aux_head`` that is
    not part of the model (never saved). It gives the vision tower a dense signal from the first step; trained by
    the answer loss alone, the tower collapses to content-free features while the LLM is still
    fitting answer priors (image variation is noise to it then), and it does not recover.
    """
    tr = model.transformer
    n_q = int(model.config.n_queries)
    if ids.shape[1] <= slot + n_q:
        raise ValueError(f"sequences of {ids.shape[1]} tokens cannot hold an image span at {slot}..{slot + n_q}")
    feats = tr.visual(pixels)
    h = tr.wte(ids)
    h = torch.cat([h[:, :slot], feats.to(h.dtype), h[:, slot + feats.shape[1] :]], dim=1)
    # Logits only where the loss looks (the answer tokens, ~5% of a row): the lm_head over every
    # position was a third of the step's FLOPs. Same value as model(..., labels=labels).loss.
    hidden, _ = tr(inputs_embeds=h, use_cache=False)
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep]).float()
    lm = torch.nn.functional.cross_entropy(logits, target[keep])
    if aux_head is None or cells is None:
        return lm, None
    out = aux_head(feats).float()
    logits, pred_boxes = out[..., :N_CELL_CLASSES], out[..., N_CELL_CLASSES:]
    aux = torch.nn.functional.cross_entropy(
        logits.reshape(-1, N_CELL_CLASSES), cells.reshape(-1).long(), weight=cell_weights
    )
    if boxes is not None and pred_boxes.shape[-1] == 4:
        on = (cells > 0).unsqueeze(-1).float()
        l1 = ((pred_boxes - boxes).abs() * on).sum() / (4 * on.sum()).clamp(min=1.0)
        aux = aux + box_weight * l1
    return lm, aux


# ---------------------------------------------------------------------------------------------
# Writing the checkpoint


def state_dict_fp16(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(out: Path, model: torch.nn.Module, tokenizer: QWenTokenizer, seq_length: int) -> dict:
    """Official layout: config.json, generation_config.json, tokenizer_config.json, qwen.tiktoken,
    model-00001-of-00001.safetensors + model.safetensors.index.json (fp16)."""
    cfg = model.config
    write_json(out / "config.json", cfg.to_official_dict("float16"))
    gen = dict(GENERATION_CONFIG, eos_token_id=tokenizer.eod_id, pad_token_id=tokenizer.eod_id,
               max_window_size=3 * seq_length)  # fmt: skip
    gen["transformers_version"] = cfg.to_dict().get("transformers_version")
    write_json(out / "generation_config.json", dict(sorted(gen.items())))
    write_json(
        out / "tokenizer_config.json",
        {
            "model_max_length": 4 * seq_length,
            "tokenizer_class": "QWenTokenizer",
            "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
            "image_span": cfg.n_queries,
        },
    )
    write_tiktoken_ranks(out / VOCAB_FILE, tokenizer.mergeable_ranks)
    return write_shards(out, [state_dict_fp16(model)], 1)


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class TrainResult:
    path: str
    steps: int
    planned_steps: int
    stopped_early: bool
    seconds: float
    device: str
    n_params: int
    final_loss: float
    eval: dict[str, dict[str, float]]
    log: dict[str, Any] = field(repr=False, default_factory=dict)


Callback = Callable[[str, dict[str, Any]], None]


def _default_pool(opts: TrainOptions, device: torch.device) -> int:
    cap = 32768 if device.type == "cuda" else 12288
    return max(64, min(opts.steps * opts.batch, cap))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_mini(
    out: str | os.PathLike,
    opts: TrainOptions | None = None,
    *,
    overwrite: bool = False,
    callback: Callback | None = None,
) -> TrainResult:
    """Train qvlq-mini and write it to ``out`` (official layout + train_log.json).

    ``callback(event, info)`` reports progress: ``"phase"`` (info: name), ``"plan"`` (planned
    steps), ``"tick"``/``"step"`` (step; loss, lr, elapsed every log_every), ``"eval"`` (scores).
    """
    opts = opts or TrainOptions()
    t_start = time.perf_counter()
    emit: Callback = callback or (lambda event, info: None)
    deadline = t_start + opts.time_budget if opts.time_budget else math.inf
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if opts.size not in SIZES:
        raise ValueError(f"unknown size {opts.size!r} (choose {', '.join(SIZES)})")
    if opts.steps < 1 or opts.batch < 1:
        raise ValueError("steps and batch must be >= 1")
    unknown = set(opts.task_weights) - {t.value for t in Task}
    if unknown:
        raise ValueError(f"unknown task(s) in task_weights: {sorted(unknown)}")
    size: MiniSize = SIZES[opts.size]
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda" and opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    torch.manual_seed(opts.seed)
    np.random.seed(opts.seed)

    # -- vocabulary, config, data (render workers are forked before any CUDA work)
    emit("phase", {"name": "vocabulary"})
    ranks = build_vocab(opts.n_ranks)
    tokenizer = QWenTokenizer(mergeable_ranks=ranks, image_span=size.n_queries)
    config = mini_config(len(ranks), size)
    if tokenizer.img_start_id != config.image_start_id:
        raise RuntimeError("tokenizer <img> id and config image_start_id disagree")
    n_pool = opts.pool or _default_pool(opts, device)
    workers = opts.workers if opts.workers is not None else min(12, max(1, (os.cpu_count() or 1) - 1))
    refresh_every = opts.refresh_every if opts.refresh_every is not None else (300 if workers > 1 else 0)
    block = min(opts.refresh_block, n_pool)
    max_len = max_sample_len(size.n_queries)
    buffers = {"pool": Buffers.allocate(n_pool, size.image_size, max_len, size.n_queries)}
    if refresh_every:
        buffers.update({f"stage{k}": Buffers.allocate(block, size.image_size, max_len, size.n_queries) for k in (0, 1)})
    flags = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)  # fmt: skip
    renderer = Renderer(tokenizer, opts.seed, size.image_size, buffers, workers)
    try:
        emit("phase", {"name": f"rendering {n_pool} training samples ({workers} worker(s))"})
        t0 = time.perf_counter()
        longest = renderer.wait(renderer.submit("pool", 0, n_pool))
        t_data = time.perf_counter() - t0
        if longest > size.seq_length:
            raise RuntimeError(f"a training sample has {longest} tokens > seq_length {size.seq_length}")
        next_index = n_pool  # the next unseen train index
        pending: list[Any] = []
        if refresh_every:
            for k in (0, 1):
                pending.append(renderer.submit(f"stage{k}", next_index, block))
                next_index += block
        return _train(
            out, opts, overwrite, emit, t_start, deadline, size, ranks, tokenizer, config, device, buffers,
            renderer, pending, next_index, refresh_every, block, t_data, workers,
        )  # fmt: skip
    finally:
        renderer.close()
        if device.type == "cuda":  # leave the process as we found it
            torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[2], flags[3]


def _train(
    out: Path, opts: TrainOptions, overwrite: bool, emit: Callback, t_start: float, deadline: float,
    size: MiniSize, ranks: dict[bytes, int], tokenizer: QWenTokenizer, config: Any, device: torch.device,
    buffers: dict[str, Buffers], renderer: Renderer, pending: list[Any], next_index: int, refresh_every: int,
    block: int, t_data: float, workers: int,
) -> TrainResult:  # fmt: skip
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        if opts.deterministic:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
    eval_final = generate_suite(opts.final_eval_n, seed=opts.seed, split="eval")
    eval_periodic = eval_final[: opts.eval_n]
    slot = image_slot(tokenizer)

    # -- model, optimiser, device pool
    emit("phase", {"name": f"moving data to {device}"})
    model = init_model(config, opts.seed).to(device)
    model.train()
    pool = Pool.from_buffers(buffers["pool"], device)
    n_pool = len(pool)
    n_params = sum(p.numel() for p in model.parameters())

    def decays(name: str, p: torch.Tensor) -> bool:  # matrices, but not embeddings/positions/queries
        keep = ("wte", "positional_embedding", "attn_pool.query", "attn_pool.attn.in_proj_weight")
        return p.dim() >= 2 and not any(k in name for k in keep)

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = []
    for vision in (False, True):  # vision groups get their own LR factor (frozen, then ramped in)
        part = [(n, p) for n, p in params if n.startswith("transformer.visual.") == vision]
        for wd in (True, False):
            chosen = [p for n, p in part if decays(n, p) == wd]
            groups.append({"params": chosen, "weight_decay": opts.weight_decay if wd else 0.0, "vision": vision})
    vision_params = [p for n, p in params if n.startswith("transformer.visual.")]
    aux_head = None
    cell_weights = None
    if opts.aux_weight > 0:
        torch.manual_seed(opts.seed + 1)
        aux_head = torch.nn.Linear(config.hidden_size, N_CELL_CLASSES + 4).to(device)
        torch.nn.init.normal_(aux_head.weight, std=config.initializer_range)
        torch.nn.init.zeros_(aux_head.bias)
        groups.append({"params": list(aux_head.parameters()), "weight_decay": 0.0, "vision": False})
        cell_weights = torch.ones(N_CELL_CLASSES, device=device)
        cell_weights[0] = opts.aux_background
    clip_params = [p for g in groups for p in g["params"]]
    adam_kw: dict[str, Any] = {"fused": True} if device.type == "cuda" else {}
    optim = torch.optim.AdamW(groups, lr=opts.lr, betas=opts.betas, eps=1e-8, **adam_kw)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    sample_w = pool.sampling_weights(opts.task_weights)
    gen = torch.Generator().manual_seed(opts.seed)
    amp = device.type == "cuda"
    autocast_dtype = torch.bfloat16 if amp else None

    planned = opts.steps
    eval_every = opts.eval_every or max(100, planned // 3)
    loss_curve: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    replans: list[dict[str, Any]] = []
    eval_seconds: list[float] = []
    refresh_waits: list[float] = []
    running = torch.zeros((), device=device)
    running_aux = torch.zeros((), device=device)
    running_n = 0
    stop_reason = "completed"
    last_loss = float("nan")
    t_train0 = time.perf_counter()
    timing_mark: tuple[int, float] | None = None  # (step, time) where the step rate is measured from
    eval_mark = 0.0  # evaluation seconds spent before timing_mark
    vision_frozen = False
    n_refresh = 0
    unique = n_pool

    def reserve() -> float:
        # final eval (scales with its size) + writing + reload; generous before any eval was timed
        per = (max(eval_seconds) / opts.eval_n) if eval_seconds else (0.02 if amp else 0.2)
        return 3.0 + 1.5 * per * opts.final_eval_n

    def run_eval(step: int) -> None:
        t = time.perf_counter()
        res = evaluate_tasks(model, tokenizer, eval_periodic, batch_size=64, autocast=autocast_dtype, n_boot=200)
        eval_seconds.append(time.perf_counter() - t)
        row = {"step": step, "seconds": round(eval_seconds[-1], 2),
               "accuracy": {k: round(v["accuracy"], 4) for k, v in res.scores.items()}}  # fmt: skip
        evals.append(row)
        emit("eval", row)

    def shrink_to_fit(step: int, per_step: float, now: float) -> None:
        """Cut the cosine horizon to what the time left allows at ``per_step`` seconds per step."""
        nonlocal planned, eval_every
        n_evals_left = max(0, (planned - step) // eval_every)
        left = deadline - now - reserve() - n_evals_left * (max(eval_seconds) if eval_seconds else 2.0)
        fit = step + int(0.97 * left / per_step)
        if fit < planned:
            replans.append({"at_step": step, "from": planned, "to": max(step + 1, fit),
                            "sec_per_step": round(per_step, 5)})  # fmt: skip
            planned = max(step + 1, fit)
            eval_every = opts.eval_every or max(100, planned // 3)
            emit("plan", {"planned": planned})

    emit("plan", {"planned": planned, "n_params": n_params, "pool": n_pool, "device": str(device)})
    step = 0
    checkpoints = (30, max(31, opts.warmup // 2), opts.warmup - 1)
    while step < planned:
        now = time.perf_counter()
        # Re-plan the horizon while still warming up (the LR does not depend on it yet).
        if opts.time_budget and opts.fit_schedule and step in checkpoints:
            if timing_mark is not None and step > timing_mark[0]:
                shrink_to_fit(step, (now - timing_mark[1]) / (step - timing_mark[0]), now)
            timing_mark = (step, time.perf_counter())
            eval_mark = sum(eval_seconds)
        if step > 0 and now + reserve() > deadline:  # at least one step, so the checkpoint is trained
            stop_reason = "time budget"
            break
        if refresh_every and step > 0 and step % refresh_every == 0:
            # Swap in the next fresh block (step-scheduled, so the data order is deterministic).
            t = time.perf_counter()
            k = n_refresh % 2
            renderer.wait(pending[k])
            pool.replace((n_refresh % (n_pool // block)) * block, buffers[f"stage{k}"])
            sample_w = pool.sampling_weights(opts.task_weights)
            pending[k] = renderer.submit(f"stage{k}", next_index, block)
            next_index += block
            n_refresh += 1
            unique += block
            refresh_waits.append(time.perf_counter() - t)

        lr = lr_at(step, opts, planned)
        v_factor = vision_lr_factor(step, opts, planned)
        frozen = v_factor == 0.0
        if frozen != vision_frozen:  # frozen: no gradient reaches the tower at all (its backward is skipped)
            for p in vision_params:
                p.requires_grad_(not frozen)
            vision_frozen = frozen
        for g in optim.param_groups:
            g["lr"] = lr * (v_factor if g["vision"] else 1.0)
        idx = torch.multinomial(sample_w, opts.batch, replacement=True, generator=gen)
        length = int(pool.lengths[idx].max())
        idx_d = idx.to(device, non_blocking=True)
        ids = pool.ids[idx_d, :length].long()
        labels = pool.labels[idx_d, :length].long()
        pixels = (pool.images[idx_d].permute(0, 3, 1, 2).float() / 255.0 - mean) / std
        cells = pool.cells[idx_d] if aux_head is not None else None
        boxes = pool.boxes[idx_d] if aux_head is not None else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss, aux = training_losses(
                model, ids, labels, pixels, slot, aux_head, cells, cell_weights, boxes, opts.aux_box_weight
            )
        total = loss if aux is None else loss + opts.aux_weight * aux
        optim.zero_grad(set_to_none=True)
        total.backward()
        if opts.grad_clip:
            torch.nn.utils.clip_grad_norm_(clip_params, opts.grad_clip)
        optim.step()
        running += loss.detach()
        if aux is not None:
            running_aux += aux.detach()
        running_n += 1
        step += 1
        if step % opts.log_every == 0 or step == planned:
            last_loss = float(running) / running_n
            aux_loss = float(running_aux) / running_n if aux_head is not None else None
            running.zero_()
            running_aux.zero_()
            running_n = 0
            elapsed = time.perf_counter() - t_start
            row = {"step": step, "loss": round(last_loss, 5), "lr": lr, "seconds": round(elapsed, 2)}
            if aux_loss is not None:
                row["aux_loss"] = round(aux_loss, 5)
            loss_curve.append(row)
            emit("step", {"step": step, "loss": last_loss, "lr": lr, "elapsed": elapsed, "planned": planned,
                          "aux_loss": aux_loss})  # fmt: skip
        else:
            emit("tick", {"step": step})
        evaluated = step % eval_every == 0 and step < planned and time.perf_counter() + reserve() < deadline
        if evaluated:
            run_eval(step)
        # Re-fit again with what the run has shown, after each evaluation and every tenth of the plan (measured
        # on an H200: a warm-up rate 20% too fast once evaluations and a second job on the GPU counted, so the
        # run stopped at 78% of its horizon with the LR still high). Shrinking mid-run only lowers the LR sooner.
        refit = evaluated or (step > opts.warmup and step % max(25, planned // 10) == 0)
        if refit and opts.time_budget and opts.fit_schedule and step < planned:
            now = time.perf_counter()
            if timing_mark is not None and step > timing_mark[0]:  # the rate since the last mark, evals excluded
                spent = now - timing_mark[1] - (sum(eval_seconds) - eval_mark)
                shrink_to_fit(step, spent / (step - timing_mark[0]), now)
            timing_mark, eval_mark = (step, time.perf_counter()), sum(eval_seconds)
    if running_n:
        last_loss = float(running) / running_n
        loss_curve.append({"step": step, "loss": round(last_loss, 5), "lr": lr_at(step - 1, opts, planned),
                           "seconds": round(time.perf_counter() - t_start, 2)})  # fmt: skip
    t_train = time.perf_counter() - t_train0
    if not math.isfinite(last_loss):
        raise RuntimeError(f"training diverged (loss {last_loss})")

    # -- write, reload exactly as users will, and score the held-out split
    emit("phase", {"name": "writing the checkpoint"})
    from qvlq.model.modeling import QWenLMHeadModel

    log: dict[str, Any] = {
        "format": "qvlq-mini train_log v1",
        "size": opts.size,
        "mini_size": size.as_dict(),
        "config": config.to_official_dict("float16"),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(opts).items()},
        "seed": opts.seed,
        "n_params": n_params,
        "vocab_ranks": len(ranks),
        "resampler_init": LOCAL_INIT,
        "aux_cell_loss": {
            "weight": opts.aux_weight,
            "background_weight": opts.aux_background,
            "box_weight": opts.aux_box_weight,
            "classes": N_CELL_CLASSES,
        }
        if opts.aux_weight > 0
        else None,
        "data": {
            "pool": n_pool,
            "workers": workers,
            "refresh_every": refresh_every,
            "refresh_block": block,
            "refreshes": n_refresh,
            "unique_samples": unique,
            "refresh_seconds": round(sum(refresh_waits), 2),
        },  # fmt: skip
        "steps": step,
        "planned_steps": planned,
        "requested_steps": opts.steps,
        "samples_seen": step * opts.batch,
        "stopped_early": step < planned,
        "stop_reason": stop_reason if step < planned else "completed",
        "replans": replans,
        "seconds": {"data": round(t_data, 2), "train": round(t_train, 2)},
        "sec_per_step": round(t_train / max(1, step), 5),
        "device": _device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loss_curve": loss_curve,
        "evals": evals,
    }
    with atomic_dir(out, overwrite) as tmp:
        write_checkpoint(tmp, model, tokenizer, size.seq_length)
        emit("phase", {"name": f"final evaluation ({len(eval_final)} held-out samples)"})
        t0 = time.perf_counter()
        loaded = QWenLMHeadModel.from_pretrained(tmp, device=device)
        final = evaluate_tasks(loaded, QWenTokenizer.from_pretrained(str(tmp)), eval_final, batch_size=100)
        log["final_eval"] = {
            "split": "eval", "seed": opts.seed, "n": final.n, "dtype": str(loaded.dtype).replace("torch.", ""),
            "method": final.method, "scores": final.scores, "examples": final.predictions[:12],
        }  # fmt: skip
        log["seconds"]["final_eval"] = round(time.perf_counter() - t0, 2)
        log["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
        write_json(tmp / "train_log.json", log)
    emit("eval", {"step": step, "final": True, "accuracy": {k: v["accuracy"] for k, v in final.scores.items()}})
    return TrainResult(
        path=str(out), steps=step, planned_steps=planned, stopped_early=step < planned,
        seconds=round(time.perf_counter() - t_start, 2), device=log["device"], n_params=n_params,
        final_loss=last_loss, eval=final.scores, log=log,
    )  # fmt: skip


def load_log(model_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "train_log.json").read_text())
