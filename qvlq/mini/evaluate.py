"""Scoring a qvlq-mini-layout model on the synthetic task suite (greedy answers, per-task accuracy).

Each sample is asked exactly as ``qvlq.chat.chat`` would ask it (one picture, default system
prompt, no history). The default ``batched`` method decodes many samples at once but stays
token-exact with ``chat(..., do_sample=False)``: prompts are grouped by token length so no row is
ever padded, and each row is cut at the first stop id and decoded the way chat() decodes it.
``method="chat"`` calls chat() itself, one sample at a time (slow; the reference).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from qvlq.chat import DEFAULT_SYSTEM, chat, make_context
from qvlq.generate import HFEngine
from qvlq.image import preprocess
from qvlq.tokenizer import from_list_format

from .tasks import Sample, score_answer, summarize

# Placeholder written between <img> and </img>: the model overwrites the whole span with the image
# features, so the bytes never reach it; the pixels are passed alongside.
IMAGE_PATH = "image.png"
MAX_NEW_TOKENS = 32  # a grounding answer is ~25 tokens with the mini vocabulary


def build_query(question: str, path: str = IMAGE_PATH) -> str:
    """``Picture 1: <img>path</img>\\n{question}``: the official list format for one image."""
    return from_list_format([{"image": path}, {"text": question}])


def prompt_ids(tokenizer: Any, question: str, system: str = DEFAULT_SYSTEM) -> list[int]:
    """The exact prompt chat() builds for ``question`` about one picture."""
    return make_context(tokenizer, build_query(question), history=[], system=system)[1]


@dataclass
class TaskEval:
    """Per-task accuracy (``scores[task] = {accuracy, ci_low, ci_high, n}``, plus ``all``)."""

    n: int
    scores: dict[str, dict[str, float]]
    method: str
    seconds: float
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def accuracy(self, task: str = "all") -> float:
        return float(self.scores[task]["accuracy"]) if task in self.scores else float("nan")


def _stops(tokenizer: Any) -> set[int]:
    return {tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id}


def _finish(tokenizer: Any, tokens: Sequence[int], stops: set[int]) -> str:
    out: list[int] = []
    for t in tokens:
        if t in stops:
            break
        out.append(t)
    return tokenizer.decode(out, skip_special_tokens=False, errors="ignore").strip()


@torch.inference_mode()
def greedy_answers(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    pixels: torch.Tensor,
    *,
    batch_size: int = 64,
    max_new_tokens: int = MAX_NEW_TOKENS,
    system: str = DEFAULT_SYSTEM,
) -> list[str]:
    """Greedy chat() answers for (question, picture) pairs; ``pixels`` [n, 3, S, S] preprocessed."""
    device = next(model.parameters()).device
    stops = _stops(tokenizer)
    prompts = [prompt_ids(tokenizer, q, system) for q in questions]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    answers: list[str] = [""] * len(questions)
    engine = HFEngine(model)
    stop_t = torch.tensor(sorted(stops), device=device)
    for length in sorted(groups):
        rows = groups[length]
        for k in range(0, len(rows), batch_size):
            chunk = rows[k : k + batch_size]
            ids = torch.tensor([prompts[i] for i in chunk], device=device)
            logits = engine.prefill(ids, images=pixels[chunk].to(device))
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            generated: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                tok = logits.argmax(dim=-1)
                generated.append(tok)
                done |= torch.isin(tok, stop_t)
                if step + 1 == max_new_tokens or bool(done.all()):
                    break
                logits = engine.step(tok)
            engine.reset()
            table = torch.stack(generated, dim=1).tolist()
            for i, toks in zip(chunk, table, strict=True):
                answers[i] = _finish(tokenizer, toks, stops)
    return answers


def sample_pixels(samples: Sequence[Sample], image_size: int) -> torch.Tensor:
    return torch.stack([preprocess(s.load_image(), image_size) for s in samples])


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    samples: Sequence[Sample],
    batch_size: int = 64,
    *,
    method: str = "batched",
    max_new_tokens: int = MAX_NEW_TOKENS,
    n_boot: int = 1000,
    seed: int = 0,
    autocast: torch.dtype | None = None,
) -> TaskEval:
    """Greedy answers to ``samples`` scored with :func:`score_answer`; per-task bootstrap CIs.

    ``autocast`` (e.g. torch.bfloat16) runs the model under CUDA autocast (fp32 training weights).
    """
    if method not in ("batched", "chat"):
        raise ValueError(f"method must be 'batched' or 'chat', not {method!r}")
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = int(model.config.visual["image_size"])
    pixels = sample_pixels(samples, size)
    ctx = (
        torch.autocast(device.type, dtype=autocast)
        if autocast is not None
        else torch.autocast(device.type, enabled=False)
    )
    try:
        with ctx:
            if method == "batched":
                preds = greedy_answers(
                    model,
                    tokenizer,
                    [s.question for s in samples],
                    pixels,
                    batch_size=batch_size,
                    max_new_tokens=max_new_tokens,
                )
            else:
                preds = [
                    chat(
                        model,
                        tokenizer,
                        build_query(s.question),
                        history=[],
                        append_history=False,
                        images=pixels[i : i + 1],
                        do_sample=False,
                        max_new_tokens=max_new_tokens,
                    )[0]
                    for i, s in enumerate(samples)
                ]
    finally:
        model.train(was_training)
    rows = []
    results = []
    for s, p in zip(samples, preds, strict=True):
        ok = score_answer(s.task, p, s.answer)
        results.append((s.task, ok))
        rows.append({"id": s.id, "task": str(s.task), "question": s.question, "answer": s.answer,
                     "prediction": p, "correct": ok})  # fmt: skip
    summary = summarize(results, n_boot=n_boot, seed=seed)
    scores = {k: dict(v._asdict()) for k, v in summary.items()}
    return TaskEval(len(samples), scores, method, time.perf_counter() - t0, rows)


def load_model(model_dir: str, device: str | None = None, dtype: str = "auto") -> tuple[Any, Any]:
    """(model, tokenizer) from a qvlq-mini-layout directory (or any official-layout Qwen-VL one)."""
    from qvlq.model.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(model_dir, device, dtype)


def evaluate_dir(
    model_dir: str, n: int = 300, seed: int = 0, *, batch_size: int = 64, method: str = "batched",
    device: str | None = None, dtype: str = "auto",
) -> TaskEval:  # fmt: skip
    """Score a model directory on the first ``n`` samples of the held-out ``eval`` split."""
    from .tasks import generate_suite

    model, tokenizer = load_model(model_dir, device, dtype)
    return evaluate_tasks(model, tokenizer, generate_suite(n, seed=seed, split="eval"), batch_size, method=method)
