"""qvlq-mini geometry: the exact Qwen-VL architecture (RMSNorm/RoPE/SwiGLU LLM, ViT + resampler
vision tower, same parameter names and checkpoint layout) at a size that trains in minutes.

Every linear of an LLM block has ``in_features`` divisible by 128, so GPTQ's group size 128 applies
as in the real model; ``visual.output_dim`` is a multiple of 128 (the resampler uses
``output_dim // 128`` heads) and ``n_queries`` is a square (image span = n_queries + 2 tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from qvlq.model.config import QWenConfig
from qvlq.tokenizer import NUM_SPECIAL

# Position of <img> among the special tokens that follow the BPE ranks (see qvlq.tokenizer).
IMG_START_OFFSET = 214


@dataclass(frozen=True)
class MiniSize:
    """Knobs of a qvlq-mini model (defaults: the shipped size, 6.8M parameters with the mini vocab)."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4
    mlp: int = 768  # SwiGLU width (config.intermediate_size = 2 * mlp, as Qwen stores it)
    image_size: int = 112  # the suite's 224 px scenes squashed to 112: shapes ~2x2 patches, a letter ~1
    patch_size: int = 14
    vis_width: int = 192
    vis_layers: int = 4
    vis_heads: int = 4
    vis_mlp_ratio: float = 4.0
    n_queries: int = 64
    seq_length: int = 512

    def as_dict(self) -> dict:
        return asdict(self)


# A micro size for tests (seconds on CPU) with the same constraints.
MICRO = MiniSize(
    hidden=128,
    layers=2,
    heads=2,
    mlp=256,
    image_size=56,
    patch_size=14,
    vis_width=64,
    vis_layers=1,
    vis_heads=2,
    n_queries=16,
    seq_length=256,
)
# What the shipped checkpoint is: trained on an H200 (163 s, batch 256; `benchmarks/train_mini_gpu.sh`), and
# still trainable on a 2-core CPU (~0.41 s per batch of 32 there). Three layers: colour/shape/existence need a
# question -> picture lookup (measured at 1200 CPU steps: loss 0.74 vs 0.89 with two layers). In the same
# 190 s GPU budget beside it, "mini" (6.8 M parameters) reached 84% held-out vs this size's 98%: fewer steps.
SMALL = MiniSize(hidden=128, layers=3, heads=4, mlp=384, vis_width=96, vis_layers=2, vis_heads=2)
SIZES = {"mini": MiniSize(), "small": SMALL, "micro": MICRO}


def padded_vocab(n_ranks: int, multiple: int = 64) -> int:
    """BPE ranks + 217 special tokens, rounded up (Qwen pads its embedding the same way)."""
    return int(math.ceil((n_ranks + NUM_SPECIAL) / multiple) * multiple)


def mini_config(n_ranks: int, size: MiniSize | None = None) -> QWenConfig:
    """A Qwen-VL :class:`QWenConfig` for a vocabulary of ``n_ranks`` BPE ranks at ``size``."""
    s = size or MiniSize()
    if s.hidden % s.heads:
        raise ValueError("hidden must be divisible by heads")
    for name, v in (("hidden", s.hidden), ("mlp", s.mlp)):
        if v % 128:
            raise ValueError(f"{name}={v} must be a multiple of 128 (GPTQ group size)")
    if math.isqrt(s.n_queries) ** 2 != s.n_queries:
        raise ValueError("n_queries must be a square number")
    if s.image_size % s.patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    if s.vis_width % s.vis_heads:
        raise ValueError("vis_width must be divisible by vis_heads")
    visual = {
        "heads": s.vis_heads,
        "image_size": s.image_size,
        "image_start_id": n_ranks + IMG_START_OFFSET,
        "layers": s.vis_layers,
        "mlp_ratio": s.vis_mlp_ratio,
        "output_dim": s.hidden,
        "patch_size": s.patch_size,
        "width": s.vis_width,
        "n_queries": s.n_queries,
    }
    return QWenConfig(
        architectures=["QWenLMHeadModel"],
        vocab_size=padded_vocab(n_ranks),
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        kv_channels=s.hidden // s.heads,
        intermediate_size=2 * s.mlp,
        seq_length=s.seq_length,
        max_position_embeddings=4 * s.seq_length,
        visual=visual,
        use_flash_attn=False,
    )
