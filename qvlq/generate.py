"""The eager decode loop (what the official HF stack does): one prefill, then one token at a time
through a growing KV cache. Sampling follows transformers' semantics (temperature, top-k, top-p)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class Sampling:
    """greedy when do_sample is False; top_k 0 and top_p 1.0 disable those filters."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    @classmethod
    def from_generation_config(cls, gc: Any, **overrides: Any) -> Sampling:
        s = cls(
            do_sample=bool(getattr(gc, "do_sample", False)),
            temperature=float(getattr(gc, "temperature", None) or 1.0),
            top_k=int(getattr(gc, "top_k", None) or 0),
            top_p=float(getattr(gc, "top_p", None) or 1.0),
        )
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] (any dtype) -> token ids [B]."""
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / max(sampling.temperature, 1e-5)
    if sampling.top_k > 0:
        kth = torch.topk(scores, min(sampling.top_k, scores.shape[-1])).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        # keep the smallest set whose probability reaches top_p (always at least the best token)
        sorted_scores, order = scores.sort(dim=-1)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - sampling.top_p
        drop_sorted[..., -1] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class HFEngine:
    """Eager decode with a growing DynamicCache: the seed's (official HF) way of generating.

    Engines share this interface (see qvlq.fast.FastEngine): prefill(...) -> last logits [B, V],
    step(tokens [B]) -> logits [B, V], reset(). Greedy tokens of all engines agree (tests)."""

    name = "hf"

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: DynamicCache | None = None

    def reset(self) -> None:
        self.cache = None

    @torch.inference_mode()
    def prefill(
        self, input_ids: torch.Tensor, images: Any = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids, images=images, image_features=image_features, cache=self.cache, use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens[:, None], cache=self.cache, use_cache=True).logits[:, -1]


@torch.inference_mode()
def stream_tokens(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] = (),
    images: Any = None,
    image_features: torch.Tensor | None = None,
    engine: Any = None,
) -> Iterator[int]:
    """Yield generated ids for a batch of one; stops after a stop id (which is yielded) or max_new_tokens."""
    sampling = sampling or Sampling()
    engine = engine or HFEngine(model)
    generator = None
    if sampling.do_sample and sampling.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(sampling.seed)
    logits = engine.prefill(input_ids, images=images, image_features=image_features)
    stop = set(stop_ids)
    for i in range(max_new_tokens):
        tok = next_token(logits, sampling, generator)
        t = int(tok[0])
        yield t
        if t in stop or i == max_new_tokens - 1:
            return
        logits = engine.step(tok)


def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling | None = None,
    stop_ids: Sequence[int] = (),
    images: Any = None,
) -> list[int]:
    return list(stream_tokens(model, input_ids, max_new_tokens, sampling, stop_ids, images=images))
