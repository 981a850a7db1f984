"""Speed and memory profile of Qwen-VL-Chat, BF16 vs Int4, on the seed's protocol (spec/protocols.md).

Workload: one image (258 tokens) plus a short text through the chat template, then exactly
`context - 258` new tokens, greedy, EOS ignored. Per (precision, engine, context) cell we report
time to first token, prefill tokens/s, decode tokens/s (generated tokens after the first / decode time),
end-to-end tokens/s (all generated tokens / time from the request, prefill included), per-token
latency percentiles, and the fraction of the memory-bandwidth bound measured in the same run. Memory
cells: "encode C" (a (C-1)-token prompt with the image, one generated token fed back) and "generate C"
(the first measured run of the speed cell), each as torch-allocated, torch-reserved, NVML process,
NVML device and host RSS peaks.

Timing: on CUDA one event is recorded after every token and all are read once at the end, so the
measurement adds no host synchronisation to the decode loop; on CPU, perf_counter. Random weights
(`random_weights="full"|"tiny"`) are generated directly on the device (speed and memory do not depend
on weight values); the Int4 variant is round-to-nearest 4-bit g128 sym packed from the same weights into
QuantLinear buffers in the official AutoGPTQ v1 format, converted in place one block at a time.

Homes: this file holds the protocol (prompts, cells, budget, the run); qvlq.measure how each figure is
taken, qvlq.random_model the random-weight models, qvlq.profile_report the rendering of a `ProfileReport`
(tables, markdown, SVG, PNG, JSON). Library functions take explicit arguments and return dataclasses; the
CLI (`qvlq profile`) is a thin wrapper.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import tuning
from .int4 import backend_problem, int4_backends
from .int4_mma import variant_selection
from .measure import (
    LatencyStats,
    MemoryReading,
    MemorySampler,
    NvmlProbe,
    RunTiming,
    bound_tok_s,
    downsample,
    free_memory,
    latency_stats,
    measure_bandwidth,
    probe_nvml,
    timed_generate,
)
from .model.loading import QUANTIZED_LINEARS
from .model.stream import StreamedBlocks, host_embedding_checked, host_mapped, host_pinning, stream_vision_checked
from .random_model import build_random_model, quantize_model_rtn

Log = Callable[[str], None]

# ------------------------------------------------------------------------------------ reference data
# The Qwen-VL README's published table (A100-SXM4-80G, PyTorch 2.0.1, CUDA 11.4, official HF code).
SEED_A100: dict[str, dict[str, float]] = {
    "bf16": {"tok_s@2048": 28.87, "tok_s@8192": 24.32, "peak_gb@encode 2048": 22.60, "peak_gb@generate 8192": 28.01},
    "int4": {"tok_s@2048": 37.79, "tok_s@8192": 34.34, "peak_gb@encode 2048": 11.82, "peak_gb@generate 8192": 17.23},
}
# protocols.md "Physical limits": bytes read per decoded token at full size, KV per context token.
PROTOCOL_READ_GB = {"bf16": 14.20, "int4": 4.61}
PROTOCOL_KV_BYTES = 0.5 * 2**20
PROTOCOL_PEAK_GBS = {"A100": 2039.0, "H100": 3350.0}
PROTOCOL_IMAGE_TOKENS = 258
# Nominal peak HBM bandwidth by CUDA device name (first match wins); unknown names get None.
NOMINAL_PEAK_GBS: tuple[tuple[str, float], ...] = (
    ("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0),
    ("A100-SXM4-80GB", 2039.0), ("A100-SXM4-40GB", 1555.0), ("A100 80GB PCIe", 1935.0), ("A100", 1555.0),
)  # fmt: skip

PROMPT_TEXT = "Describe this picture in detail."
IMAGE_NAME = "synthetic.png"  # written into the image span; the pixels are passed as a tensor
FILLER_TEXT = (
    "The photograph shows a quiet street in the early morning, with parked bicycles, a bakery whose "
    "windows are fogged by the warmth inside, and a few people walking towards the station. "
)
PRIOR_TOK_S = {"hf": 30.0, "fast": 100.0}  # budget planning before anything was measured on this GPU
FULL_SIZE_PARAMS = 1_000_000_000  # above this, a CPU profile is refused


REFERENCE = "hf (reference run)"  # the cross-check's other side when only one engine is profiled


class ProfileRefused(ValueError):
    """A profile that cannot reasonably run (full size on CPU, contexts too short...), one line."""


class EngineUnavailable(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ the bound
def protocol_bound(gpu: str, precision: str, context: int) -> float:
    """The protocols.md table: nominal bandwidth, 14.20 / 4.61 GB per token, 0.5 MiB KV, 258 -> context."""
    return bound_tok_s(
        PROTOCOL_PEAK_GBS[gpu], PROTOCOL_READ_GB[precision] * 1e9, PROTOCOL_KV_BYTES, PROTOCOL_IMAGE_TOKENS, context
    )


def nominal_peak_gbs(device_name: str) -> float | None:
    return next((v for k, v in NOMINAL_PEAK_GBS if k in device_name), None)


# ------------------------------------------------------------------------------------ weight accounting
@dataclass
class WeightAccounting:
    float_params: int  # parameters of the float model (a quantized linear counts in x out)
    linear_params: int  # the 5 x n_layers block linears
    linear_bytes: int  # their weight bytes (float weight, or qweight + qzeros + scales)
    checkpoint_bytes: int  # every tensor of the state dict (official format)
    resident_bytes: int  # on the device: plus backend caches (the int4 kernel's repacked weight), less host_bytes
    host_bytes: int  # kept in host memory: streamed ViT blocks, a host-mapped embedding (qvlq.model.stream)
    read_bytes_per_token: int  # what one decoded token reads: block linears, norms, lm_head, one wte row
    kv_bytes_per_token: int  # K and V of all layers for one context token

    @property
    def bits_per_weight_linears(self) -> float:
        return 8 * self.linear_bytes / max(self.linear_params, 1)

    @property
    def bits_per_weight_overall(self) -> float:
        return 8 * self.checkpoint_bytes / max(self.float_params, 1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_quant(m: nn.Module) -> bool:
    return type(m).__name__ == "QuantLinear"


def weight_accounting(model: nn.Module) -> WeightAccounting:
    """Bytes of the actual model (works on meta models too). g_idx is not counted as read: the int4
    kernels use contiguous groups; the bias of a quantized linear is (it is added every call)."""
    cfg = model.config
    t = model.transformer
    linear_params = linear_bytes = read = 0
    for block in t.h:
        for name in QUANTIZED_LINEARS:
            m = block.get_submodule(name)
            if _is_quant(m):
                linear_params += m.in_features * m.out_features
                lb = _nbytes(m.qweight) + _nbytes(m.qzeros) + _nbytes(m.scales)
                if m.backend == "dequant":  # serves a cached float weight: that is what each token reads
                    read += m.in_features * m.out_features * t.wte.weight.element_size() + _nbytes(m.bias)
                else:
                    read += lb + _nbytes(m.bias)
            else:
                linear_params += m.weight.numel()
                lb = _nbytes(m.weight)
                read += lb + (_nbytes(m.bias) if m.bias is not None else 0)
            linear_bytes += lb
        read += _nbytes(block.ln_1.weight) + _nbytes(block.ln_2.weight)
    row = t.wte.weight.shape[1] * t.wte.weight.element_size()  # the embedding reads one row per token
    read += _nbytes(t.ln_f.weight) + _nbytes(model.lm_head.weight) + row

    float_params = 0
    seen: set[int] = set()
    checkpoint = resident = host = 0
    for mod in model.modules():
        if isinstance(mod, StreamedBlocks):  # its state dict holds the host blocks; the device holds two slots
            float_params += mod.host_params
            host += mod.host_bytes
            resident += mod.slot_bytes
        elif _is_quant(mod):
            float_params += mod.in_features * mod.out_features + mod.out_features
            for v in getattr(mod, "_cache", {}).values():
                if isinstance(v, torch.Tensor) and v.device.type != "meta":
                    resident += _nbytes(v)
        else:
            float_params += sum(p.numel() for p in mod.parameters(recurse=False))
            mapped = host_mapped(mod)  # read by the device in place: in the state dict, not in device memory
            host += _nbytes(mapped) if mapped is not None else 0
    for v in model.state_dict(keep_vars=True).values():
        key = id(v) if v.device.type == "meta" else v.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        checkpoint += _nbytes(v)
    resident += checkpoint - host
    kv_item = t.wte.weight.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * kv_item
    return WeightAccounting(float_params, linear_params, linear_bytes, checkpoint, resident, host, read, kv)


# ------------------------------------------------------------------------------------ prompts
def bundled_tokenizer(n_queries: int = 256) -> Any:
    from .tokenizer import QWenTokenizer

    with resources.as_file(resources.files("qvlq") / "assets" / "qwen.tiktoken") as vocab:
        return QWenTokenizer(vocab_file=str(vocab), image_span=n_queries)


def prompt_ids(tokenizer: Any, length: int | None = None) -> list[int]:
    """One image plus a short question through the chat template; with `length`, filler text is
    inserted at the end of the user turn so the prompt has exactly `length` tokens."""
    from .chat import make_context

    _, ids = make_context(tokenizer, f"Picture 1: <img>{IMAGE_NAME}</img>\n{PROMPT_TEXT}")
    if length is None or length == len(ids):
        return ids
    need = length - len(ids)
    if need < 0:
        raise ProfileRefused(f"a prompt of {length} tokens is shorter than the image prompt ({len(ids)} tokens)")
    base = tokenizer.encode_text(FILLER_TEXT)
    filler = (base * (need // len(base) + 1))[:need]
    end = len(ids) - 1 - ids[::-1].index(tokenizer.im_end_id)  # the user turn's <|im_end|>
    return ids[:end] + filler + ids[end:]


def synthetic_pixels(image_size: int, seed: int, device: torch.device) -> torch.Tensor:
    """A normalised-looking pixel tensor [1, 3, S, S] (no file needed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, image_size, image_size, generator=g).clamp(-2, 2).to(device)


def example_pixels(image_size: int, device: torch.device) -> torch.Tensor:
    from .image import load_image, preprocess

    with resources.as_file(resources.files("qvlq") / "assets" / "example.png") as p:
        return preprocess(load_image(p), image_size)[None].to(device)


# ------------------------------------------------------------------------------------ engines
def make_engine(name: str, model: Any, max_seq_len: int, fast_options: dict[str, Any] | None = None) -> Any:
    if name == "hf":
        from .generate import HFEngine

        return HFEngine(model)
    if name == "fast":
        try:
            from .fast import make_engine as make_fast
        except ImportError as e:
            raise EngineUnavailable(f"qvlq.fast unavailable ({e})") from None
        return make_fast("fast", model, max_seq_len, **(fast_options or {}))
    raise ValueError(f"unknown engine {name!r} (hf or fast)")


def describe_engine(engine: Any) -> dict[str, Any]:
    if hasattr(engine, "describe"):
        return dict(engine.describe())
    int4 = int4_backends(engine.model)
    return {
        "engine": getattr(engine, "name", type(engine).__name__),
        "cache": "transformers DynamicCache (grows by concatenation every token)",
        "attention": "SDPA (model default)",
        "compile": None,
        "cuda_graphs": None,
        "int4_backend": ",".join(sorted(int4)) or None,
    }


# ------------------------------------------------------------------------------------ report data
@dataclass
class SpeedCell:
    precision: str
    engine: str
    context: int
    mode: str = "full"  # "full" or "windowed" (decode rate estimated from windows along the run)
    status: str = "ok"  # ok | OOM | skipped: budget | partial: budget | n/a: ... | error: ...
    runs: int = 0
    runs_planned: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    ttft_ms: float | None = None
    prefill_tok_s: float | None = None
    decode_tok_s: float | None = None
    decode_tok_s_stdev: float | None = None  # across runs (None for one run)
    e2e_tok_s: float | None = None
    latency: LatencyStats | None = None
    bound_tok_s: float | None = None
    pct_of_bound: float | None = None
    effective_gbs: float | None = None
    seconds: float = 0.0
    note: str = ""
    series_position: list[float] = field(default_factory=list)  # generated-token index
    series_latency_ms: list[float] = field(default_factory=list)


@dataclass
class MemoryCell:
    precision: str
    engine: str
    cell: str  # "encode 2048" | "generate 8192"
    context: int
    status: str = "ok"
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    nvml_process_bytes: int | None = None
    nvml_device_bytes: int | None = None
    host_rss_bytes: int | None = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class ModelInfo:
    precision: str
    source: str
    random_weights: bool
    dtype: str
    float_params: int
    weight_bytes: int
    weight_bytes_kind: str  # "on disk" or "in memory (checkpoint format)"
    resident_bytes: int
    bits_per_weight_linears: float
    bits_per_weight_overall: float
    read_bytes_per_token: int
    kv_bytes_per_token: int
    int4_backends: dict[str, int]
    build_seconds: float
    host_bytes: int = 0  # weights in host memory (--stream-vision, --host-embedding)
    stream_check: str = ""  # the image features after streaming against before (stream_vision_checked)
    embedding_check: str = ""  # the prompt's embeddings after mapping against before (host_embedding_checked)
    host_pinning: str = ""  # how the host-kept weights are page-locked (qvlq.model.stream.host_pinning)
    int4_selection: list[dict[str, Any]] = field(default_factory=list)  # qvlq.int4.kernel_selection()
    int4_fused: list[dict[str, Any]] = field(default_factory=list)  # qvlq.int4_mma.variant_selection()


@dataclass
class CrossCheck:
    precision: str
    context: int
    engines: list[str]
    compared: int
    agree: int
    first_divergence: int | None
    note: str = ""
    # the HF loop's top-2 logit gap over its largest |logit|: at the first divergence, or the smallest over the
    # compared tokens when none; None without a reference run's logits (two measured engines)
    reference_margin: float | None = None


@dataclass
class Environment:
    device: str
    device_name: str
    compute_capability: str | None
    device_memory_bytes: int | None
    driver: str | None
    cuda: str | None
    torch: str
    transformers: str
    qvlq: str
    python: str
    cpu: str
    cpu_threads: int
    torch_threads: int
    nvml: str


@dataclass
class ProfileReport:
    settings: dict[str, Any]
    environment: Environment
    bandwidth_gbs: float
    nominal_peak_gbs: float | None
    models: list[ModelInfo]
    engines: dict[str, dict[str, Any]]  # "precision/engine@context" -> describe()
    speed: list[SpeedCell]
    memory: list[MemoryCell]
    crosschecks: list[CrossCheck]
    notes: list[str]
    started: str
    seconds: float
    seed_reference: dict[str, dict[str, float]] = field(default_factory=lambda: SEED_A100)


# ------------------------------------------------------------------------------------ settings
@dataclass
class ProfileSettings:
    models: list[str] = field(default_factory=list)
    random_weights: str | None = None  # "full" | "tiny"
    precisions: list[str] = field(default_factory=lambda: ["bf16", "int4"])
    engines: list[str] = field(default_factory=lambda: ["hf", "fast"])
    contexts: list[int] = field(default_factory=lambda: [2048, 8192])
    runs: list[int] | None = None  # per context (one value = all); None: 3 on GPU, 1 on CPU
    device: str | None = None
    dtype: str = "auto"  # model directories only
    int4_dtype: str = "fp16"  # random Int4 variant: the official checkpoint's dtype
    max_seconds: float | None = None
    windowed: list[tuple[str, int]] = field(default_factory=list)  # (engine, context) cells
    window_tokens: int = 64
    window_points: int = 5
    warmup_tokens: int = 64  # 0 = a full-length warm-up run
    crosscheck_tokens: int = 32
    fast_compile: str = "auto"  # FastEngine compile: auto | off | a torch.compile mode
    int4_kernel: str = "fastest"  # QuantLinear backend of the Int4 layers; fastest = timed per shape (CUDA)
    kv_block: int | None = None
    attention: str = "fastest"  # FastEngine decode attention: sdpa | math | triton | fastest (timed on CUDA)
    fuse: str = "block"  # FastEngine int4 fusion: block | mlp | off (see FastEngine fuse_mlp, fuse_block)
    stream_vision: bool = False  # the ViT's blocks in host memory, streamed per image (qvlq.model.stream)
    host_embedding: bool = False  # the token-embedding table in host memory, read in place (qvlq.model.stream)
    seed: int = 0

    def runs_for(self, context: int, on_gpu: bool) -> int:
        if self.runs is None:
            return 3 if on_gpu else 1
        if len(self.runs) == 1:
            return self.runs[0]
        return self.runs[self.contexts.index(context)]

    def validate(self) -> None:
        if bool(self.models) == bool(self.random_weights):
            raise ProfileRefused("give model directories or --random-weights full|tiny (exactly one of them)")
        if self.random_weights not in (None, "full", "tiny"):
            raise ProfileRefused(f"--random-weights must be full or tiny, got {self.random_weights!r}")
        bad = [p for p in self.precisions if p not in ("bf16", "int4")]
        if bad or not self.precisions:
            raise ProfileRefused(f"--precisions takes bf16 and/or int4, got {','.join(self.precisions) or 'nothing'}")
        bad = [e for e in self.engines if e not in ("hf", "fast")]
        if bad or not self.engines:
            raise ProfileRefused(f"--engine takes hf, fast or both, got {','.join(self.engines) or 'nothing'}")
        if not self.contexts or any(c <= 0 for c in self.contexts) or len(set(self.contexts)) != len(self.contexts):
            raise ProfileRefused(f"--contexts must be distinct positive totals, got {self.contexts}")
        if self.runs is not None and (
            any(r < 1 for r in self.runs) or len(self.runs) not in (1, len(self.contexts))
        ):
            raise ProfileRefused("--runs takes one count >= 1, or one per context")
        from .fast import ATTENTIONS

        if self.attention not in ATTENTIONS:
            raise ProfileRefused(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.kv_block is not None and self.attention in ("triton", "fastest"):
            raise ProfileRefused(f"--kv-block buckets SDPA's length; --attention {self.attention} bounds the read "
                                 "itself: use --attention sdpa with --kv-block")  # fmt: skip
        from .fast import FUSE_LEVELS

        if self.fuse not in FUSE_LEVELS:
            raise ProfileRefused(f"--fuse must be one of {', '.join(FUSE_LEVELS)}, got {self.fuse!r}")
        if self.int4_dtype not in ("fp16", "bf16"):
            raise ProfileRefused("--int4-dtype must be fp16 or bf16")
        if self.window_tokens < 2 or self.window_points < 2:
            raise ProfileRefused("--window-tokens and --window-points must be at least 2")
        for e, c in self.windowed:
            if e not in self.engines or c not in self.contexts:
                raise ProfileRefused(f"--windowed {e}@{c}: not one of the profiled engines/contexts")


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ProfileRefused(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_windowed(text: str) -> list[tuple[str, int]]:
    """'hf@8192,fast@8192' -> [('hf', 8192), ('fast', 8192)]."""
    out = []
    for item in filter(None, text.replace(" ", "").split(",")):
        m = re.fullmatch(r"(hf|fast)@(\d+)", item)
        if not m:
            raise ProfileRefused(f"--windowed takes ENGINE@CONTEXT items (e.g. hf@8192), got {item!r}")
        out.append((m.group(1), int(m.group(2))))
    return out


def parse_engines(text: str) -> list[str]:
    return ["hf", "fast"] if text == "both" else [e for e in text.replace(" ", "").split(",") if e]


# ------------------------------------------------------------------------------------ environment
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device, nvml: NvmlProbe) -> Environment:
    import transformers

    from . import __version__

    name, cap, mem = _cpu_model(), None, None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, cap, mem = props.name, f"{props.major}.{props.minor}", int(props.total_memory)
    return Environment(
        device=str(device), device_name=name, compute_capability=cap, device_memory_bytes=mem,
        driver=nvml.driver, cuda=torch.version.cuda, torch=torch.__version__, transformers=transformers.__version__,
        qvlq=__version__, python=platform.python_version(), cpu=_cpu_model(), cpu_threads=os.cpu_count() or 0,
        torch_threads=torch.get_num_threads(), nvml=nvml.status,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ feasibility
def _meta_accounting(config: Any, quantized: bool, dtype: torch.dtype) -> WeightAccounting:
    from .model.loading import replace_quantized_linears
    from .model.modeling import QWenLMHeadModel

    cfg = copy_config(config)
    if quantized and not cfg.is_quantized:
        cfg.quantization_config = {"bits": 4, "group_size": 128, "quant_method": "gptq"}
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg).to(dtype)
    if quantized:
        replace_quantized_linears(model, cfg)
    return weight_accounting(model)


def copy_config(config: Any) -> Any:
    return type(config)(**config.to_dict())


def check_feasible(
    settings: ProfileSettings, configs: dict[str, Any], device: torch.device, image_tokens: int
) -> None:
    """Refuse a full-size model on CPU with a one-line estimate of what it would take."""
    if device.type != "cpu":
        return
    per_tok: dict[str, WeightAccounting] = {}
    floats: dict[int, WeightAccounting] = {}  # random bf16/int4 share one config: build its meta model once
    for label, cfg in configs.items():
        if id(cfg) not in floats:
            floats[id(cfg)] = _meta_accounting(cfg, False, torch.bfloat16)
        acc = floats[id(cfg)]
        if acc.float_params > FULL_SIZE_PARAMS:
            per_tok[label] = _meta_accounting(cfg, True, torch.bfloat16) if label.startswith("int") else acc
    if not per_tok:
        return
    bw = measure_bandwidth(device)
    total_s, n_tokens = 0.0, 0
    for acc in per_tok.values():
        for c in settings.contexts:
            n = max(c - image_tokens, 1)
            tokens = n * (settings.runs_for(c, on_gpu=False) + 1) * len(settings.engines)
            n_tokens += tokens
            per_token = acc.read_bytes_per_token + acc.kv_bytes_per_token * (image_tokens + n / 2)
            total_s += tokens * per_token / (bw * 1e9)
    reads = ", ".join(f"{k} {v.read_bytes_per_token / 1e9:.2f} GB" for k, v in per_tok.items())
    worst = max(v.read_bytes_per_token for v in per_tok.values())
    raise ProfileRefused(
        f"full-size profile on CPU refused: each decoded token reads {reads} of weights; at the measured CPU "
        f"memcpy bandwidth of {bw:.1f} GB/s that is >= {worst / (bw * 1e9):.2f} s/token, so this plan "
        f"({n_tokens:,} decoded tokens) needs >= {total_s / 3600:.1f} h; run it on a GPU, or profile the tiny "
        "geometry on CPU (--random-weights tiny --contexts 300,320)"
    )


# ------------------------------------------------------------------------------------ the profile
class _Clock:
    """Wall-clock budget: a global deadline, split evenly between the model variants still to run."""

    def __init__(self, max_seconds: float | None) -> None:
        self.t0 = time.monotonic()
        self.deadline = None if max_seconds is None else self.t0 + max_seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def share(self, parts_left: int) -> float | None:
        if self.deadline is None:
            return None
        now = time.monotonic()
        return now + max(self.deadline - now, 0.0) / max(parts_left, 1)


@dataclass
class _Variant:
    """One model to profile: its precision label and how to get it (the Int4 random variant is made
    from the BF16 one in place, so profiling order is fixed: bf16 first)."""

    precision: str
    source: str
    random_weights: bool


class _Profiler:
    def __init__(self, settings: ProfileSettings, device: torch.device, log: Log) -> None:
        self.s = settings
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.log = log
        self.nvml = probe_nvml(device)
        self.speed: list[SpeedCell] = []
        self.memory: list[MemoryCell] = []
        self.models: list[ModelInfo] = []
        self.engines: dict[str, dict[str, Any]] = {}
        self.first_tokens: dict[tuple[str, str, int], list[int]] = {}
        self.reference_margins: dict[str, list[float]] = {}  # precision -> the reference run's top-2 gaps
        self.rates: dict[str, float] = {}  # engine -> latest measured decode tok/s (budget planning)
        self.bandwidth = 0.0

    # -------------------------------------------------------------- budget estimates
    def _rate(self, engine: str) -> float:
        if engine in self.rates:
            return self.rates[engine]
        return PRIOR_TOK_S[engine] if self.on_gpu else 10.0

    def _estimate_cell_s(self, engine: str, context: int, image_tokens: int, runs: int) -> float:
        n = context - image_tokens
        slow = 1.0 + 0.5 * context / 8192  # later tokens read more KV (and hf re-concatenates it)
        if (engine, context) in self.s.windowed:
            decode = self.s.window_points * (self.s.window_tokens / self._rate(engine) * slow + 1.0)
        else:
            decode = runs * n / self._rate(engine) * slow
        warm = (self.s.warmup_tokens or n) / self._rate(engine)
        return 5.0 + warm + decode

    # -------------------------------------------------------------- cells
    def _memory_cell(self, precision: str, engine: str, cell: str, context: int) -> MemoryCell:
        m = MemoryCell(precision, engine, cell, context)
        self.memory.append(m)
        return m

    @staticmethod
    def _store(m: MemoryCell, r: MemoryReading) -> None:
        m.allocated_bytes, m.reserved_bytes = r.allocated, r.reserved
        m.nvml_process_bytes, m.nvml_device_bytes, m.host_rss_bytes = r.nvml_process, r.nvml_device, r.host_rss

    def encode_cell(self, engine: Any, tokenizer: Any, pixels: torch.Tensor, precision: str, name: str,
                    context: int) -> None:  # fmt: skip
        """(context-1)-token prompt with the image, then the generated token fed back: context tokens cached."""
        m = self._memory_cell(precision, name, f"encode {context}", context)
        t0 = time.monotonic()
        try:
            ids = torch.tensor([prompt_ids(tokenizer, context - 1)], device=self.device)
            with MemorySampler(self.device, self.nvml) as ms, torch.no_grad():
                engine.reset()
                tok = engine.prefill(ids, images=pixels).argmax(-1)
                engine.step(tok)
            self._store(m, ms.reading)
            m.note = f"prefill {context - 1} tokens incl. the image + 1 generated token"
        except torch.OutOfMemoryError:
            m.status = "OOM"
        except Exception as e:  # one broken cell must not cost the whole (device-time-limited) report
            m.status = self._error(e)
        finally:
            m.seconds = time.monotonic() - t0
            engine.reset()
            free_memory(self.device)

    def speed_cell(self, engine: Any, tokenizer: Any, pixels: torch.Tensor, precision: str, name: str,
                   context: int, image_tokens: int, acc: WeightAccounting, deadline: float | None,
                   warm_rate: float | None, reserve_s: float = 0.0) -> SpeedCell:  # fmt: skip
        """The measured runs of one cell. The first run always goes (the cell was admitted) and stops at
        the deadline if it must; repeats only if they also leave `reserve_s` for the first runs of the
        cells still to come."""
        s = self.s
        cell = SpeedCell(precision, name, context, runs_planned=s.runs_for(context, self.on_gpu))
        self.speed.append(cell)
        base = prompt_ids(tokenizer)
        n_new = context - image_tokens
        cell.prompt_tokens, cell.new_tokens = len(base), n_new
        ids = torch.tensor([base], device=self.device)
        gen = self._memory_cell(precision, name, f"generate {context}", context)
        t_cell = time.monotonic()
        runs: list[RunTiming] = []
        try:
            if (name, context) in s.windowed:
                self._windowed(engine, tokenizer, pixels, cell, gen, n_new, deadline)
                self._bound(cell, acc)
                return cell
            for i in range(cell.runs_planned):
                if deadline is not None and i > 0:
                    est = n_new / (runs[-1].decode_tok_s or warm_rate or self._rate(name)) + 2.0
                    if time.monotonic() + est + reserve_s > deadline:
                        cell.note = f"{i} of {cell.runs_planned} runs (budget)"
                        break
                if i == 0:  # the protocol's "generate" memory cell is the first measured run
                    with MemorySampler(self.device, self.nvml) as ms:
                        run = timed_generate(engine, ids, pixels, n_new, self.device, deadline)
                    self._store(gen, ms.reading)
                    gen.seconds = time.monotonic() - t_cell
                    gen.note = f"{len(base)}-token prompt + {len(run.tokens)} generated"
                else:
                    run = timed_generate(engine, ids, pixels, n_new, self.device, deadline)
                runs.append(run)
                self.log(f"  {precision}/{name}@{context} run {i + 1}: {run.decode_tok_s or 0:.1f} decode tok/s, "
                         f"TTFT {run.ttft_ms:.0f} ms{' (aborted: budget)' if run.aborted else ''}")  # fmt: skip
                if run.decode_tok_s:
                    self.rates[name] = run.decode_tok_s
                if run.aborted:
                    cell.status = f"partial: budget ({len(run.tokens)} of {n_new} tokens)"
                    gen.status = cell.status
                    break
                free_memory(self.device)
        except torch.OutOfMemoryError:
            cell.status = "OOM"
            if gen.allocated_bytes is None:
                gen.status = "OOM"
        except Exception as e:
            cell.status = self._error(e)
            if gen.allocated_bytes is None and gen.host_rss_bytes is None:
                gen.status = cell.status
        finally:
            cell.seconds = time.monotonic() - t_cell
            engine.reset()
            free_memory(self.device)
        if runs:
            self._summarise(cell, runs, acc)
        return cell

    def _summarise(self, cell: SpeedCell, runs: list[RunTiming], acc: WeightAccounting) -> None:
        cell.runs = len(runs)
        cell.ttft_ms = statistics.fmean(r.ttft_ms for r in runs)
        cell.prefill_tok_s = cell.prompt_tokens / (cell.ttft_ms / 1e3)
        rates = [r.decode_tok_s for r in runs if r.decode_tok_s]
        cell.decode_tok_s = statistics.fmean(rates) if rates else None
        cell.decode_tok_s_stdev = statistics.stdev(rates) if len(rates) > 1 else None
        cell.e2e_tok_s = statistics.fmean(r.e2e_tok_s for r in runs)
        cell.latency = latency_stats([x for r in runs for x in r.latencies_ms])
        pos, lat = downsample(runs[0].latencies_ms)
        cell.series_position, cell.series_latency_ms = [p + 1 for p in pos], lat
        self._bound(cell, acc)

    def _bound(self, cell: SpeedCell, acc: WeightAccounting) -> None:
        start, end = cell.prompt_tokens, cell.prompt_tokens + cell.new_tokens
        if cell.decode_tok_s and self.bandwidth > 0:
            cell.bound_tok_s = bound_tok_s(self.bandwidth, acc.read_bytes_per_token, acc.kv_bytes_per_token, start, end)
            cell.pct_of_bound = 100 * cell.decode_tok_s / cell.bound_tok_s
            per_tok = acc.read_bytes_per_token + acc.kv_bytes_per_token * (start + end) / 2
            cell.effective_gbs = cell.decode_tok_s * per_tok / 1e9

    def _windowed(self, engine: Any, tokenizer: Any, pixels: torch.Tensor, cell: SpeedCell, gen: MemoryCell,
                  n_new: int, deadline: float | None) -> None:  # fmt: skip
        """Decode rate over the whole run estimated from `window_points` windows of `window_tokens`
        decoded tokens, each after a prefill to its start position: the per-token cost depends only
        on the context length, so integrating the windows' mean latency over the run's positions
        gives its decode time. The last window's peak memory stands in for "generate"."""
        s = self.s
        cell.mode = "windowed"
        cell.runs_planned = 1
        P, W = cell.prompt_tokens, s.window_tokens
        last = P + n_new - W - 1
        starts = sorted({int(round(x)) for x in np.linspace(P, max(last, P), s.window_points)})
        centers, means, lat_all, ttft = [], [], [], None
        for k, p in enumerate(starts):
            if deadline is not None and time.monotonic() > deadline:
                cell.status = f"partial: budget ({k} of {len(starts)} windows)"
                break
            ids = torch.tensor([prompt_ids(tokenizer, p)], device=self.device)
            if k == len(starts) - 1:
                t_win = time.monotonic()
                with MemorySampler(self.device, self.nvml) as ms:
                    run = timed_generate(engine, ids, pixels, W + 1, self.device, deadline)
                self._store(gen, ms.reading)
                gen.seconds = time.monotonic() - t_win
                gen.note = f"windowed: prefill {p} tokens + {W + 1} generated (not the grown cache of a full run)"
            else:
                run = timed_generate(engine, ids, pixels, W + 1, self.device, deadline)
            if k == 0:
                ttft = run.ttft_ms
            lat = run.latencies_ms
            if lat:
                centers.append(p + (len(lat) - 1) / 2)  # step i feeds the token at position p + i
                means.append(statistics.fmean(lat))
                lat_all += lat
        if not means:
            cell.status = cell.status if cell.status != "ok" else "skipped: budget"
            gen.status = cell.status
            return
        positions = np.arange(P, P + n_new - 1)  # the full run's decode steps feed positions P .. P+n_new-2
        est_ms = float(np.interp(positions, centers, means).sum())
        cell.runs = 1
        cell.ttft_ms = ttft
        cell.prefill_tok_s = P / (ttft / 1e3) if ttft else None
        cell.decode_tok_s = (n_new - 1) / (est_ms / 1e3)
        cell.e2e_tok_s = n_new / ((est_ms + (ttft or 0.0)) / 1e3)
        cell.latency = latency_stats(lat_all)
        cell.series_position = [c - P + 1 for c in centers]
        cell.series_latency_ms = means
        cell.note = f"estimated from {len(means)} windows x {W} tokens at positions {starts}"
        self.rates[cell.engine] = cell.decode_tok_s

    # -------------------------------------------------------------- per model
    def profile_model(self, model: Any, info: ModelInfo, acc: WeightAccounting, tokenizer: Any,
                      pixels: torch.Tensor, image_tokens: int, deadline: float | None) -> None:  # fmt: skip
        s = self.s
        prec = info.precision
        P = len(prompt_ids(tokenizer))
        fast_opts: dict[str, Any] = {}
        if s.fast_compile != "auto":
            fast_opts["compile"] = {"off": False, "on": True}.get(s.fast_compile, s.fast_compile)
        if s.kv_block is not None:
            fast_opts["kv_block"] = s.kv_block
        fast_opts["attention"] = s.attention
        from .fast import fuse_options

        fast_opts.update(fuse_options(s.fuse))
        pairs = [(c, e) for c in s.contexts for e in s.engines]
        for k, (context, name) in enumerate(pairs):
            n_new = context - image_tokens
            tag = f"{prec}/{name}@{context}"
            if deadline is not None:
                need = self._estimate_cell_s(name, context, image_tokens, 1)
                left = deadline - time.monotonic()
                # the variant's last cell may start with 30 s left: a partial run beats none
                if need > left and not (k == len(pairs) - 1 and left > 30):
                    self._skip(prec, name, context, "skipped: budget", P, n_new)
                    self.log(f"{tag}: skipped (budget: ~{need:.0f} s needed, {deadline - time.monotonic():.0f} s left)")
                    continue
            # what the first runs of the remaining cells need: repeats here must leave it
            reserve = sum(self._estimate_cell_s(e, c, image_tokens, 1) for c, e in pairs[k + 1 :])
            self.log(f"{tag}: engine, warm-up, encode {context}, runs")
            try:
                engine = make_engine(name, model, P + n_new, fast_opts if name == "fast" else None)
            except EngineUnavailable as e:
                self._skip(prec, name, context, f"n/a: {e}", P, n_new)
                continue
            except torch.OutOfMemoryError:
                free_memory(self.device)
                self._skip(prec, name, context, "OOM", P, n_new, note="out of memory building the engine")
                continue
            except Exception as e:
                self._skip(prec, name, context, self._error(e), P, n_new)
                continue
            warm_rate = None
            try:
                warm_n = min(n_new, max(s.warmup_tokens, s.crosscheck_tokens)) if s.warmup_tokens else n_new
                if getattr(engine, "kv_block", None):  # one CUDA graph per KV bucket: capture them all now
                    warm_n = n_new
                ids = torch.tensor([prompt_ids(tokenizer)], device=self.device)
                warm = timed_generate(engine, ids, pixels, warm_n, self.device, deadline)
                warm_rate = warm.steady_tok_s
                if warm_rate:
                    self.rates[name] = warm_rate
                self.first_tokens[(prec, name, context)] = warm.tokens[: s.crosscheck_tokens]
                self.log(f"  warm-up {warm_n} tokens: {warm_rate or 0:.1f} tok/s, TTFT {warm.ttft_ms:.0f} ms")
            except Exception as e:
                oom = isinstance(e, torch.OutOfMemoryError)
                engine.reset()
                free_memory(self.device)
                self._skip(prec, name, context, "OOM" if oom else self._error(e), P, n_new,
                           note="in the warm-up")  # fmt: skip
                del engine
                free_memory(self.device)
                continue
            self.encode_cell(engine, tokenizer, pixels, prec, name, context)
            cell = self.speed_cell(engine, tokenizer, pixels, prec, name, context, image_tokens, acc, deadline,
                                   warm_rate, reserve)  # fmt: skip
            self.engines[tag] = desc = describe_engine(engine)
            if cell.decode_tok_s:
                self.log(f"{tag}: {cell.decode_tok_s:.1f} decode tok/s ({cell.mode}), {cell.status}")
            del engine
            if desc.get("compile"):  # compiled graphs and their CUDA-graph pools outlive the engine otherwise
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
            free_memory(self.device)
        if "hf" not in s.engines:
            self.reference_tokens(model, tokenizer, pixels, prec, deadline)

    def reference_tokens(self, model: Any, tokenizer: Any, pixels: torch.Tensor, prec: str,
                         deadline: float | None) -> None:  # fmt: skip
        """The HF loop's first crosscheck_tokens greedy tokens on the same prompt (one short run, ~1-2 s at full
        size on a GPU): a profile without the hf engine still says whether its engines decode the right tokens."""
        n = self.s.crosscheck_tokens
        if not n or not any(k[0] == prec for k in self.first_tokens):
            return
        if deadline is not None and deadline - time.monotonic() < 20:
            self.log(f"{prec}: no reference tokens (budget)")
            return
        ids = torch.tensor([prompt_ids(tokenizer)], device=self.device)
        engine = None
        try:
            engine = make_engine("hf", model, ids.shape[1] + n)
            tokens, self.reference_margins[prec] = greedy_margins(engine, ids, pixels, n)
            self.first_tokens[(prec, REFERENCE, 0)] = tokens
        except Exception as e:  # the measured cells stand without it
            self.log(f"{prec}: no reference tokens: {self._error(e)}")
        finally:
            del engine
            free_memory(self.device)

    def _error(self, e: BaseException) -> str:
        """Status text for an unexpected failure; the traceback goes to the log."""
        self.log("".join(traceback.format_exception(type(e), e, e.__traceback__)).rstrip())
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"error: {type(e).__name__}" + (f": {msg}" if msg else "")

    def _skip(self, prec: str, name: str, context: int, status: str, P: int, n_new: int, note: str = "") -> None:
        c = SpeedCell(prec, name, context, status=status, prompt_tokens=P, new_tokens=n_new, note=note,
                      runs_planned=self.s.runs_for(context, self.on_gpu))  # fmt: skip
        self.speed.append(c)
        for cell in (f"encode {context}", f"generate {context}"):
            self._memory_cell(prec, name, cell, context).status = status

    def crosschecks(self) -> list[CrossCheck]:
        """The first two engines' leading tokens per (precision, context); with one engine, its tokens against
        the HF loop's reference run (reference_tokens)."""
        out = []
        a, b = (self.s.engines[:2] if len(self.s.engines) > 1 else [self.s.engines[0], REFERENCE])
        precs = list(dict.fromkeys(m.precision for m in self.models))
        for prec in precs:
            for c in self.s.contexts:
                ta = self.first_tokens.get((prec, a, c))
                tb = self.first_tokens.get((prec, b, 0 if b == REFERENCE else c))
                if ta is None or tb is None:
                    continue
                n = min(len(ta), len(tb))
                agree = sum(x == y for x, y in zip(ta[:n], tb[:n], strict=True))
                first = next((i for i in range(n) if ta[i] != tb[i]), None)
                margins = self.reference_margins.get(prec) if b == REFERENCE else None
                margin = None if not margins else min(margins[:n]) if first is None else margins[first]
                out.append(CrossCheck(prec, c, [a, b], n, agree, first, crosscheck_note(first, margin), margin))
        return out


NEAR_TIE = 2e-2  # a top-2 gap this small (of the largest |logit|) is within what 16-bit kernels may differ by


def crosscheck_note(first: int | None, margin: float | None) -> str:
    """What a cross-check's first divergence means, from the HF loop's top-2 gap there (see CrossCheck)."""
    if first is None:
        return "identical"
    if margin is None:
        return f"diverge at token {first} (no reference logits to say whether it was a near-tie)"
    if margin <= NEAR_TIE:
        return f"diverge at token {first}, a near-tie: the HF loop's top-2 logits {margin:.1e} of its largest apart"
    return f"diverge at token {first}, NOT a near-tie: the HF loop's top-2 logits {margin:.1e} of its largest apart"


@torch.no_grad()
def greedy_margins(
    engine: Any, ids: torch.Tensor, pixels: torch.Tensor | None, n: int
) -> tuple[list[int], list[float]]:
    """n greedy tokens of a batch-1 engine, each with its top-2 logit gap over the largest |logit|."""
    engine.reset()
    logits = engine.prefill(ids, images=pixels)
    tokens, margins = [], []
    for i in range(n):
        row = logits[0].float()
        top = row.topk(2).values
        margins.append(float((top[0] - top[1]) / row.abs().max().clamp_min(1e-30)))
        tok = logits.argmax(-1)
        tokens.append(int(tok[0]))
        if i < n - 1:
            logits = engine.step(tok)
    return tokens, margins


def _model_info(model: Any, precision: str, source: str, random_weights: bool, build_s: float,
                disk_bytes: int | None) -> tuple[ModelInfo, WeightAccounting]:  # fmt: skip
    from .int4 import kernel_selection

    acc = weight_accounting(model)
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    info = ModelInfo(
        precision=precision, source=source, random_weights=random_weights, dtype=dtype,
        float_params=acc.float_params,
        weight_bytes=disk_bytes if disk_bytes is not None else acc.checkpoint_bytes,
        weight_bytes_kind="on disk" if disk_bytes is not None else "in memory (checkpoint format)",
        resident_bytes=acc.resident_bytes, host_bytes=acc.host_bytes,
        bits_per_weight_linears=acc.bits_per_weight_linears,
        bits_per_weight_overall=8 * (disk_bytes or acc.checkpoint_bytes) / max(acc.float_params, 1),
        read_bytes_per_token=acc.read_bytes_per_token, kv_bytes_per_token=acc.kv_bytes_per_token,
        int4_backends=int4_backends(model), build_seconds=build_s,
        int4_selection=kernel_selection() if acc.bits_per_weight_linears < 16 else [],
    )  # fmt: skip
    return info, acc


def precision_label(config: Any) -> str:
    if config.is_quantized:
        return f"int{int(config.quantization_config['bits'])}"
    td = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "bfloat16")
    return {"float16": "fp16", "float32": "fp32"}.get(td.removeprefix("torch."), "bf16")


def run_profile(settings: ProfileSettings, log: Log | None = None) -> ProfileReport:
    """Run the whole profile and return its report (nothing is written; see write_report)."""
    from .model.loading import read_config, resolve_device, resolve_model_dir, weight_files

    log = log or (lambda _msg: None)
    s = settings
    s.validate()
    clock = _Clock(s.max_seconds)
    device = resolve_device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ProfileRefused(f"device {device} requested but CUDA is not available")
    problem = backend_problem(s.int4_kernel, device)
    if problem:
        raise ProfileRefused(f"--int4-kernel {problem}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # events and streams follow the current device
    started = datetime.now().isoformat(timespec="seconds")
    loaded_before = len(tuning.LOADED)

    # what to profile
    variants: list[_Variant] = []
    configs: dict[str, Any] = {}
    if s.random_weights:
        from .checkpoint import preset_config

        base = preset_config(s.random_weights)
        for p in ("bf16", "int4"):
            if p in s.precisions:
                variants.append(_Variant(p, f"random:{s.random_weights}", True))
                configs[p] = base
        n_queries = base.n_queries
    else:
        n_queries = 256
        for m in s.models:
            d = resolve_model_dir(m)
            cfg = read_config(d)
            label = precision_label(cfg)
            if any(v.precision == label for v in variants):  # two dirs of one precision: keep rows apart
                label = f"{label}:{d.name}"
            variants.append(_Variant(label, str(d), False))
            configs[f"{label}:{d}"] = cfg
            n_queries = cfg.n_queries
    image_tokens = n_queries + 2
    if s.models:  # a model's own vocabulary (qvlq-mini has a small one); random weights use the real one
        from .tokenizer import QWenTokenizer

        tokenizer = QWenTokenizer.from_pretrained(str(resolve_model_dir(s.models[0])))
    else:
        tokenizer = bundled_tokenizer(n_queries)
    P = len(prompt_ids(tokenizer))
    too_short = [c for c in s.contexts if c - 1 < P or c - image_tokens < 2]
    if too_short:
        raise ProfileRefused(
            f"context(s) {too_short} too short: the prompt is one image ({image_tokens} tokens) plus text, "
            f"{P} tokens in all; use contexts >= {P + 1} (e.g. --contexts 300,320 for the tiny model)"
        )
    check_feasible(s, configs, device, image_tokens)

    prof = _Profiler(s, device, log)
    env = environment(device, prof.nvml)
    log(f"device {env.device_name}; measuring copy bandwidth")
    prof.bandwidth = measure_bandwidth(device)
    log(f"bandwidth {prof.bandwidth:.0f} GB/s (device copy, 2 x bytes / time)")
    if s.random_weights:
        pixels = synthetic_pixels(int(configs[variants[0].precision].visual["image_size"]), s.seed, device)
    else:
        pixels = example_pixels(int(next(iter(configs.values())).visual["image_size"]), device)

    model = None
    build_error = ""
    for i, v in enumerate(variants):
        deadline = clock.share(len(variants) - i)
        t0 = time.monotonic()
        disk = None
        if v.random_weights:
            if model is None:
                log(f"building random {s.random_weights} BF16 weights on {device}")
                model = build_random_model(s.random_weights, device, s.seed)
            if v.precision == "int4":
                log("packing Int4 (RTN 4-bit g128 sym, official v1 format) in place, one layer at a time")
                try:
                    quantize_model_rtn(model, dtype=torch.float16 if s.int4_dtype == "fp16" else torch.bfloat16,
                                       backend=s.int4_kernel)  # fmt: skip
                except Exception as e:  # keep what was measured so far
                    build_error = prof._error(e)
                    log(f"int4 variant not built: {build_error}")
                    break
                free_memory(device)
        else:
            from .model.modeling import QWenLMHeadModel

            del model
            model = None
            free_memory(device)
            log(f"loading {v.source}")
            model = QWenLMHeadModel.from_pretrained(
                v.source, device=device, dtype=s.dtype, int4_backend=s.int4_kernel, int4_lean=True
            )
            disk = sum(f.stat().st_size for f in weight_files(Path(v.source)))
        checked = mapped = ""
        if s.stream_vision:
            checked = stream_vision_checked(model, pixels)
        if s.host_embedding:  # after the Int4 variant's cast: a cast makes a new device table (mapped again here)
            mapped = host_embedding_checked(model, torch.tensor([prompt_ids(tokenizer)], device=device))
        free_memory(device)
        info, acc = _model_info(model, v.precision, v.source, v.random_weights, time.monotonic() - t0, disk)
        info.stream_check, info.embedding_check, info.host_pinning = checked, mapped, host_pinning(model)
        prof.models.append(info)
        log(
            f"{v.precision}: {info.weight_bytes / 1e9:.2f} GB weights, {acc.read_bytes_per_token / 1e9:.3f} GB read "
            f"per token, int4 kernels {info.int4_backends or '-'} (built in {info.build_seconds:.1f} s)"
        )
        prof.profile_model(model, info, acc, tokenizer, pixels, image_tokens, deadline)
        info.resident_bytes = weight_accounting(model).resident_bytes  # lazily built kernel caches included
        if info.int4_selection:  # the fused launches' configs, tuned when the fast engines were built
            info.int4_fused = variant_selection()
        free_memory(device)
    del model
    free_memory(device)

    notes = report_notes(s, env, prof.bandwidth, P, image_tokens)
    if s.stream_vision:
        notes.append("Streamed vision tower against the resident one (the same image's features, before and after "
                     "streaming): " + "; ".join(f"{m.precision}: {m.stream_check}" for m in prof.models)
                     + (" (the Int4 variant is packed in place from the streamed BF16 model)" if s.random_weights
                        else ""))  # fmt: skip
    if s.host_embedding:
        notes.append("Host-mapped embedding against the resident one (the prompt's embeddings, before and after "
                     "mapping): " + "; ".join(f"{m.precision}: {m.embedding_check}" for m in prof.models))
    if any(m.host_pinning for m in prof.models):
        pinning = "; ".join(f"{m.precision}: {m.host_pinning}" for m in prof.models if m.host_pinning)
        notes.append(f"Host memory page-locked for the device: {pinning}.")
    if len(tuning.LOADED) > loaded_before:
        notes.append("Tuning results loaded from the on-disk cache instead of timed in this run (qvlq.tuning: "
                     "measured earlier by another process on this device with the same software and kernel "
                     "sources; QVLQ_CACHE_DIR=off times everything again): "
                     + tuning.summary(tuning.LOADED[loaded_before:]) + ".")  # fmt: skip
    if build_error:
        notes.append(f"The Int4 variant could not be built ({build_error}); only BF16 was profiled.")
    return ProfileReport(
        settings=_settings_dict(s), environment=env, bandwidth_gbs=prof.bandwidth,
        nominal_peak_gbs=nominal_peak_gbs(env.device_name) if device.type == "cuda" else None,
        models=prof.models, engines=prof.engines, speed=prof.speed, memory=prof.memory,
        crosschecks=prof.crosschecks(), notes=notes, started=started, seconds=clock.elapsed(),
    )  # fmt: skip


def _settings_dict(s: ProfileSettings) -> dict[str, Any]:
    d = asdict(s)
    d["windowed"] = [f"{e}@{c}" for e, c in s.windowed]
    return d


def report_notes(s: ProfileSettings, env: Environment, bandwidth: float, prompt: int, image_tokens: int) -> list[str]:
    notes = [
        f"Workload: one image ({image_tokens} tokens) + short text through the ChatML template = {prompt}-token "
        f"prompt, then exactly context - {image_tokens} new tokens, greedy, EOS ignored (the seed's protocol).",
        "decode tok/s = (generated tokens - 1) / time from the first to the last token (prefill excluded); "
        "e2e tok/s = generated tokens / time from the request to the last token (prefill and image encoder "
        "included). TTFT includes the vision tower; prefill tok/s = prompt tokens / TTFT.",
        "Per-token latencies: " + ("CUDA events recorded after every token and read once at the end (no host sync "
                                   "in the loop)." if env.device.startswith("cuda") else "perf_counter per token.")
        + " Percentiles and stdev pool all tokens of the measured runs; the warm-up is a short run "
        + (f"({max(s.warmup_tokens, s.crosscheck_tokens)} tokens)" if s.warmup_tokens else "(full length)")
        + " on the same engine instance, not measured.",
        f"Memory: 'encode C' = a (C-1)-token prompt with the image and one generated token fed back (C tokens "
        f"cached; protocols.md words the 2048 cell as 1792 tokens of context, this is the larger reading); "
        f"'generate C' = the first measured run (prompt + C - {image_tokens} tokens). Allocator peaks are reset "
        "per cell; NVML process/device and host RSS are sampled every 50 ms. GB = 1e9 bytes (the seed's unit "
        "is not stated).",
        f"Bound = measured copy bandwidth ({bandwidth:.0f} GB/s) / (weight bytes read per token + KV bytes per "
        "token x mean context of the run); '% of bound' = decode tok/s / bound.",
        "Seed reference: Qwen-VL README, A100-SXM4-80G, PyTorch 2.0.1, official HF code; whether its tok/s "
        "includes prefill and whether its memory is allocator or NVML is unknown.",
    ]
    if s.random_weights:
        notes.insert(0, f"WEIGHTS ARE RANDOM ({s.random_weights} geometry, seed {s.seed}), generated on the device: "
                        "speed and memory do not depend on weight values, generated text is meaningless. The Int4 "
                        "variant is RTN 4-bit g128 sym from the same weights, in the official GPTQ v1 layout "
                        f"(non-quantized weights {s.int4_dtype}, as the official Int4 checkpoint).")  # fmt: skip
    if s.stream_vision:
        notes.append("VISION TOWER STREAMED (--stream-vision): the ViT's blocks stay in pinned host memory and are "
                     "copied to the device, two block buffers in turn, each time an image is encoded. 'resident GB' "
                     "and the memory cells count the two buffers, not the blocks; TTFT includes the copies; decode "
                     "does not use the vision tower.")  # fmt: skip
    if s.host_embedding:
        notes.append("EMBEDDING IN HOST MEMORY (--host-embedding): the token-embedding table stays in pinned host "
                     "memory and the GPU reads its rows in place across the bus (one row a decoded token). "
                     "'resident GB' and the memory cells leave it out; its bytes are the '+ host' beside resident "
                     "GB.")  # fmt: skip
    if s.windowed:
        notes.append(
            "Windowed cells (" + ", ".join(f"{e}@{c}" for e, c in s.windowed) + f"): the decode rate is estimated "
            f"from {s.window_points} windows of {s.window_tokens} tokens after prefills to positions spread over the "
            "run (mean latency interpolated over all positions); their 'generate' memory is the last window's."
        )
    if s.max_seconds:
        notes.append(f"Time budget {s.max_seconds:.0f} s: cells that would not fit are reported as skipped.")
    return notes


__all__ = [
    "CrossCheck", "Environment", "MemoryCell", "ModelInfo", "ProfileRefused", "ProfileReport", "ProfileSettings",
    "SpeedCell", "WeightAccounting", "protocol_bound", "run_profile", "weight_accounting",
]  # fmt: skip
