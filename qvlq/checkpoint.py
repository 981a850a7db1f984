"""Random-weight Qwen-VL-Chat checkpoints in the exact official directory layout.

`full` is the real 9.6B geometry; it is generated and written one shard at a time (each tensor from
its own seeded generator), so host memory stays around one shard. `tiny` keeps the real vocabulary
and image geometry (448 px, 256 queries, 258 tokens per image) with small widths, for tests."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .io import atomic_dir, plan_shards, write_json, write_shards
from .model.config import DEFAULT_VISUAL, QWenConfig
from .model.vision import sincos_pos_embed_2d

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
MAX_SHARD_BYTES = 2_000_000_000

CHAT_GENERATION_CONFIG = {
    "chat_format": "chatml",
    "do_sample": True,
    "eos_token_id": 151643,
    "max_new_tokens": 512,
    "max_window_size": 6144,
    "pad_token_id": 151643,
    "top_k": 0,
    "top_p": 0.3,
    "transformers_version": "4.31.0",
}
TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def preset_config(size: str) -> QWenConfig:
    """`full`: Qwen-VL-Chat as published. `tiny`: real vocab and image geometry, small widths."""
    if size == "full":
        return QWenConfig(architectures=["QWenLMHeadModel"], use_flash_attn=False)
    if size == "tiny":
        visual = dict(DEFAULT_VISUAL, layers=2, width=64, heads=4, output_dim=128)
        return QWenConfig(
            architectures=["QWenLMHeadModel"],
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            kv_channels=32,
            intermediate_size=2 * 384,  # MLP width 384: every block linear splits into 128-groups
            visual=visual,
            use_flash_attn=False,
        )
    raise ValueError(f"unknown size {size!r} (choose tiny or full)")


def tensor_inventory(config: QWenConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the float checkpoint, from the model built on the meta device."""
    from .model.modeling import QWenLMHeadModel

    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def init_tensor(
    name: str, shape: tuple[int, ...], config: QWenConfig, seed: int, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Deterministic per-tensor init (independent of order and sharding). `device` "cuda" draws from a
    seeded CUDA generator: just as deterministic and far faster for `full`, but other values than "cpu"."""
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std = config.initializer_range
    if name.endswith("attn_pool.pos_embed"):
        return sincos_pos_embed_2d(shape[1], int(round(shape[0] ** 0.5)))
    if name.endswith("visual.positional_embedding"):
        return torch.randn(shape, generator=g, device=device) * shape[1] ** -0.5
    if name.endswith("visual.proj"):
        return torch.randn(shape, generator=g, device=device) * shape[0] ** -0.5
    is_norm = any(t in name for t in ("ln_1", "ln_2", "ln_f", "ln_pre", "ln_post", "ln_q", "ln_kv"))
    if is_norm:
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    if name.endswith("bias"):
        return torch.zeros(shape)
    if name.endswith("c_proj.weight") and name.startswith("transformer.h."):
        std = std / (2 * config.num_hidden_layers) ** 0.5  # residual-branch scaling, as the reference init
    return torch.randn(shape, generator=g, device=device) * std


@dataclass
class CheckpointInfo:
    path: str
    size: str
    dtype: str
    seed: int
    n_params: int
    total_bytes: int
    n_shards: int


def write_model_files(out: Path, config: QWenConfig, dtype: torch.dtype) -> None:
    """config.json, generation_config.json, tokenizer_config.json and qwen.tiktoken, as the official repo."""
    write_json(out / "config.json", config.to_official_dict(DTYPE_NAMES[dtype]))
    write_json(out / "generation_config.json", CHAT_GENERATION_CONFIG)
    write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)
    vocab = resources.files("qvlq") / "assets" / "qwen.tiktoken"
    (out / "qwen.tiktoken").write_bytes(vocab.read_bytes())


def init_checkpoint(
    out: str | Path,
    size: str = "tiny",
    seed: int = 0,
    dtype: str = "bf16",
    overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    on_tensor: Callable[[str, int], None] | None = None,
    device: str | torch.device = "cpu",
) -> CheckpointInfo:
    """Write a random-weight Qwen-VL-Chat to `out` (atomically); `on_tensor(name, nbytes)` reports progress.
    `device="cuda"` generates every tensor on the GPU (see init_tensor): minutes less for `full`."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose {', '.join(DTYPES)})")
    config = preset_config(size)
    tdtype = DTYPES[dtype]
    shapes = tensor_inventory(config)
    itemsize = torch.empty((), dtype=tdtype).element_size()
    sizes = {k: itemsize * int(torch.Size(s).numel()) for k, s in shapes.items()}
    shards = plan_shards(sizes, max_shard_bytes)

    def generate():
        for names in shards:
            tensors = {}
            for n in names:
                tensors[n] = init_tensor(n, shapes[n], config, seed, device).to(tdtype).cpu()
                if on_tensor:
                    on_tensor(n, sizes[n])
            yield tensors

    with atomic_dir(out, overwrite) as tmp:
        write_model_files(tmp, config, tdtype)
        index = write_shards(tmp, generate(), len(shards))
    n_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return CheckpointInfo(str(out), size, dtype, seed, n_params, index["metadata"]["total_size"], len(shards))


def total_bytes(size: str, dtype: str) -> int:
    shapes = tensor_inventory(preset_config(size))
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    return itemsize * sum(int(torch.Size(s).numel()) for s in shapes.values())


def read_index(model_dir: Path) -> dict:
    return json.loads((model_dir / "model.safetensors.index.json").read_text())
