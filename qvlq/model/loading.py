"""Loading official-layout checkpoints without running any code from the model directory.

A model is built on the meta device and each shard's tensors are assigned as they are read, so peak
host memory is one shard, not the model. GPTQ checkpoints get qvlq's QuantLinear in place of the five
block linears before loading."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import QWenConfig, dtype_name, validate_config_dict

QUANTIZED_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.tiktoken", "*.bin"]
# Tensors some checkpoints carry that the native model computes instead.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class CheckpointError(ValueError):
    """A model directory that cannot be loaded, with a one-line reason."""


def resolve_model_dir(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (weights and data files only)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    s = str(name_or_path)
    looks_local = s.startswith((".", "/", "~")) or os.sep in s.rstrip(os.sep) and s.count("/") != 1
    if p.exists():
        raise CheckpointError(f"{s} is a file, not a model directory")
    if looks_local or hub_kwargs.get("local_files_only"):
        raise CheckpointError(f"model directory not found: {s}")
    try:
        from huggingface_hub import snapshot_download

        keep = {k: hub_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in hub_kwargs}
        return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS, **keep))
    except Exception as e:  # offline, unknown repo, auth...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{s} is not a local directory and could not be fetched from the Hugging Face hub ({msg}); "
            "pass a local model directory"
        ) from None


def read_config(model_dir: Path) -> QWenConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (not a model directory)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    try:
        validate_config_dict(d, str(model_dir))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return QWenConfig(**d)


def resolve_dtype(config: QWenConfig, dtype: Any, device: torch.device) -> torch.dtype:
    """Explicit dtype wins; then the config's bf16/fp16/fp32 flags; then auto like the reference:
    bf16 on a GPU that supports it, fp16 on other GPUs, fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        return getattr(torch, dtype_name(dtype))
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    if config.fp32:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_device(device: Any = None, device_map: Any = None) -> torch.device:
    d = device if device is not None else device_map
    if d is None or d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(d, dict):  # a single-device map is all qvlq supports
        devices = set(d.values())
        if len(devices) != 1:
            raise CheckpointError("multi-device device_map is not supported; pass one device")
        d = devices.pop()
    return torch.device(f"cuda:{d}" if isinstance(d, int) else d)


def weight_files(model_dir: Path) -> list[Path]:
    """Shards named by an index (safetensors preferred, then .bin), or a single weights file."""
    for index, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (model_dir / index).is_file():
            try:
                wm = json.loads((model_dir / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{model_dir / index}: invalid index ({e})") from None
            files = [model_dir / f for f in sorted(set(wm.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{model_dir}: shard(s) listed in {index} are missing: {', '.join(missing)}")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(f"{model_dir}: no model.safetensors(.index.json) or pytorch_model.bin found")


def iter_tensors(files: list[Path], device: torch.device) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """One shard at a time as a state-dict fragment; .bin only through weights_only unpickling."""
    for f in files:
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt", device=str(device)) as sf:
                    yield f, {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118 (safe_open API)
            else:
                yield f, torch.load(f, map_location=device, weights_only=True)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"corrupt or truncated weights file {f}: {str(e).splitlines()[0]}") from None


def replace_quantized_linears(model: nn.Module, config: QWenConfig) -> None:
    """Swap the five block linears for QuantLinear shells matching the GPTQ tensors on disk."""
    from ..int4 import QuantLinear

    qc = config.quantization_config
    for block in model.transformer.h:
        for name in QUANTIZED_LINEARS:
            parent_name, attr = name.split(".")
            parent = getattr(block, parent_name)
            lin: nn.Linear = getattr(parent, attr)
            ql = QuantLinear(
                lin.in_features, lin.out_features, bits=int(qc["bits"]), group_size=int(qc["group_size"]),
                device="meta",
            )
            setattr(parent, attr, ql)


def load_pretrained(cls: type, name_or_path: Any, **kwargs: Any) -> Any:
    config = kwargs.pop("config", None)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = resolve_device(kwargs.pop("device", None), kwargs.pop("device_map", None))
    backend = kwargs.pop("int4_backend", "auto")
    lean = bool(kwargs.pop("int4_lean", False))  # QuantLinear.prepare(lean=): one copy of the weight on the device
    hub = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    kwargs.pop("trust_remote_code", None)  # never honoured: nothing from the directory is executed
    model_dir = resolve_model_dir(name_or_path, **hub)
    if not isinstance(config, QWenConfig):
        config = read_config(model_dir)
    for k, v in kwargs.items():  # e.g. use_cache=False, as from_pretrained allows
        setattr(config, k, v)
    target = resolve_dtype(config, dtype, device)
    files = weight_files(model_dir)

    with torch.device("meta"):
        model = cls(config)
    if config.is_quantized:
        replace_quantized_linears(model, config)
    expected = set(model.state_dict().keys())
    int4_keys = {
        f"{name}.{b}" for name, m in model.named_modules() if type(m).__name__ == "QuantLinear" for b in m.state_dict()
    }
    seen: set[str] = set()
    for f, sd in iter_tensors(files, device):
        unexpected = [k for k in sd if k not in expected and not k.endswith(IGNORABLE_SUFFIXES)]
        if unexpected:
            raise CheckpointError(f"{f.name}: tensors the Qwen-VL architecture does not have, e.g. {unexpected[:3]}")
        # GPTQ scales/bias stay fp16 as stored: QuantLinear.prepare picks their kernel dtype itself
        sd = {
            k: (v.to(target) if v.is_floating_point() and k not in int4_keys else v)
            for k, v in sd.items()
            if k in expected
        }
        shapes = model.state_dict()
        for k, v in sd.items():
            if tuple(shapes[k].shape) != tuple(v.shape):
                want = tuple(shapes[k].shape)
                raise CheckpointError(f"{f.name}: {k} has shape {tuple(v.shape)}, the config expects {want}")
        model.load_state_dict(sd, strict=False, assign=True)
        seen.update(sd)
        del sd
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{model_dir}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[:3]}")
    model.to(device=device, dtype=None)
    # assign=True keeps requires_grad of the loaded tensors (False); inference is the use here
    model.eval()
    model.config.dtype = target
    model.name_or_path = str(name_or_path)
    if config.is_quantized:
        from ..int4 import QuantLinear

        for m in model.modules():
            if isinstance(m, QuantLinear):
                m.prepare(backend=backend, lean=lean and device.type == "cuda")
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_dict(json.loads(gen.read_text()))
    return model


def load_model_and_tokenizer(
    model_dir: Any, device: Any = None, dtype: Any = "auto", int4_backend: str = "auto", stream_vision: bool = False,
    host_embedding: bool = False,
) -> tuple[Any, Any]:  # fmt: skip
    """(QWenLMHeadModel, QWenTokenizer) from one official-layout directory or hub id; an Int4 model's layers
    on `int4_backend` (qvlq.int4.BACKENDS); stream_vision: the ViT's blocks in host memory; host_embedding: the
    token-embedding table in host memory, read in place (both qvlq.model.stream)."""
    from ..tokenizer import QWenTokenizer
    from .modeling import QWenLMHeadModel
    from .stream import keep_in_host

    path = resolve_model_dir(model_dir)
    model = QWenLMHeadModel.from_pretrained(path, device=device, dtype=dtype, int4_backend=int4_backend)
    keep_in_host(model, stream_vision, host_embedding)
    return model, QWenTokenizer.from_pretrained(str(path))
