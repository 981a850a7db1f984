"""Qwen-VL-Chat conversations: the ChatML context builder (token-exact with the reference), the
chat / chat_stream API of the official model, and drawing grounded answers on the latest picture."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image

from .fast import engine_for
from .generate import Sampling, stream_tokens
from .grounding import draw_boxes, parse_boxes
from .image import load_image

DEFAULT_SYSTEM = "You are a helpful assistant."
History = list[tuple[str, str]]


def make_context(
    tokenizer: Any,
    query: str,
    history: History | None = None,
    system: str = DEFAULT_SYSTEM,
    max_window_size: int = 6144,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """(raw_text, token ids) of the prompt. Role word, "\\n" and content are tokenized separately and
    concatenated, as the reference does; history is kept newest-first while it fits max_window_size."""
    if chat_format == "raw":
        return query, tokenizer.encode_text(query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat_format {chat_format!r} (chatml or raw)")
    start, end = [tokenizer.im_start_id], [tokenizer.im_end_id]
    nl = tokenizer.encode_text("\n")

    def turn(role: str, content: str) -> list[int]:
        return start + tokenizer.encode_text(role) + nl + tokenizer.encode_text(content) + end

    system_tokens = turn("system", system)
    raw = ""
    kept: list[int] = []
    for q, r in reversed(history or []):
        tokens = nl + turn("user", q) + nl + turn("assistant", r)
        if len(system_tokens) + len(tokens) + len(kept) >= max_window_size:
            break
        kept = tokens + kept
        raw = f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>" + raw
    tokens = system_tokens + kept + nl + turn("user", query) + nl + start + tokenizer.encode_text("assistant") + nl
    raw = f"<|im_start|>system\n{system}<|im_end|>" + raw
    raw += f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    return raw, tokens


def render_conversation(
    tokenizer: Any, turns: History, system: str = DEFAULT_SYSTEM
) -> tuple[str, list[int]]:
    """(raw_text, token ids) of a whole conversation, final assistant reply and its <|im_end|> included:
    the make_context prompt for the last question (all earlier turns kept, no window) followed by
    the reply, so it is token-exact with what chat() feeds the model plus what the model answered."""
    if not turns:
        raise ValueError("a conversation needs at least one (user, assistant) turn")
    *history, (query, reply) = turns
    raw, tokens = make_context(tokenizer, query, history, system, max_window_size=sys.maxsize)
    return raw + f"{reply}<|im_end|>", tokens + tokenizer.encode_text(reply) + [tokenizer.im_end_id]


def _setup(model: Any, tokenizer: Any, query: str, history: History | None, kwargs: dict) -> tuple:
    gc = getattr(model, "generation_config", None)
    chat_format = kwargs.pop("chat_format", getattr(gc, "chat_format", "chatml"))
    window = kwargs.pop("max_window_size", getattr(gc, "max_window_size", None) or 6144)
    system = kwargs.pop("system", DEFAULT_SYSTEM)
    max_new = kwargs.pop("max_new_tokens", getattr(gc, "max_new_tokens", None) or 512)
    sampling = kwargs.pop("sampling", None) or Sampling.from_generation_config(
        gc, **{k: kwargs.pop(k) for k in ("do_sample", "top_p", "top_k", "temperature", "seed") if k in kwargs}
    )
    images = kwargs.pop("images", None)
    engine = kwargs.pop("engine", "auto")
    if kwargs:
        raise TypeError(f"unexpected chat arguments: {', '.join(kwargs)}")
    raw, tokens = make_context(tokenizer, query, history, system, window, chat_format)
    stop = [tokenizer.im_end_id, tokenizer.im_start_id] if chat_format == "chatml" else [tokenizer.eod_id]
    stop.append(tokenizer.eod_id)
    device = next(model.parameters()).device
    ids = torch.tensor([tokens], device=device)
    return ids, max_new, sampling, stop, images, engine_for(model, ids.shape[1] + max_new, engine)


def chat_stream(
    model: Any, tokenizer: Any, query: str, history: History | None = None, **kwargs: Any
) -> Iterator[str]:
    """Yield the growing response text (like the reference's chat_stream)."""
    ids, max_new, sampling, stop, images, engine = _setup(model, tokenizer, query, history, kwargs)
    out: list[int] = []
    for t in stream_tokens(model, ids, max_new, sampling, stop, images=images, engine=engine):
        if t in stop:
            break
        out.append(t)
        yield tokenizer.decode(out, skip_special_tokens=False, errors="ignore")


def chat(
    model: Any, tokenizer: Any, query: str, history: History | None = None, append_history: bool = True, **kwargs: Any
) -> tuple[str, History]:
    """One turn: (response, history). Generation settings default to model.generation_config; pass
    do_sample/top_p/top_k/temperature/seed, max_new_tokens, system, max_window_size, images
    (PIL images / paths / pixel tensors used instead of the paths written in the query), or engine
    ("auto": the CUDA-graph static-cache engine on CUDA, the HF loop elsewhere; "hf"; "fast": see
    qvlq.fast.engine_for)."""
    history = [] if history is None else history
    response = ""
    for partial in chat_stream(model, tokenizer, query, history, **kwargs):
        response = partial
    response = response.strip()
    if append_history:
        history.append((query, response))
    return response, history


_IMG = re.compile(r"<img>(.*?)</img>", re.DOTALL)


def latest_picture(history: History, query: str | None = None) -> str | None:
    """The path of the most recent picture in the conversation (the query counts as newest)."""
    texts = [query] if query else []
    for q, r in reversed(history):
        texts += [r, q]
    for t in texts:
        found = _IMG.findall(t or "")
        if found:
            return found[-1]
    return None


def draw_on_latest_picture(response: str, history: History, query: str | None = None) -> Image.Image | None:
    """The latest picture with the response's boxes drawn, or None when there is no box or picture."""
    boxes = parse_boxes(response)
    path = latest_picture(history, query)
    if not boxes or path is None:
        return None
    return draw_boxes(load_image(path), boxes)
