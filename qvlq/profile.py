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

Library functions take explicit arguments and return dataclasses; `render_*`/`write_report` turn a
`ProfileReport` into tables, markdown, SVG, PNG and JSON. The CLI (`qvlq profile`) is a thin wrapper.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import platform
import re
import statistics
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .model.loading import QUANTIZED_LINEARS
from .report import TableSpec, markdown_tables, md_escape, render_rich, save_tables_svg  # noqa: F401 (cli imports render_rich here)

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


class ProfileRefused(ValueError):
    """A profile that cannot reasonably run (full size on CPU, contexts too short...), one line."""


class EngineUnavailable(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ statistics
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]; nan for no values."""
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass
class LatencyStats:
    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    stdev_ms: float
    min_ms: float
    max_ms: float


def latency_stats(lat_ms: Sequence[float]) -> LatencyStats:
    """Per-token latency summary; stdev is the sample stdev (0 for a single value)."""
    x = [float(v) for v in lat_ms]
    if not x:
        nan = float("nan")
        return LatencyStats(0, nan, nan, nan, nan, nan, nan, nan)
    return LatencyStats(
        n=len(x),
        mean_ms=statistics.fmean(x),
        p50_ms=percentile(x, 50),
        p90_ms=percentile(x, 90),
        p99_ms=percentile(x, 99),
        stdev_ms=statistics.stdev(x) if len(x) > 1 else 0.0,
        min_ms=min(x),
        max_ms=max(x),
    )


def bound_tok_s(
    bandwidth_gbs: float, weight_bytes: float, kv_bytes_per_token: float, start_ctx: float, end_ctx: float
) -> float:
    """Batch-1 decode upper bound averaged over a run from start_ctx to end_ctx tokens of context:
    every token reads all weights once plus the KV cache so far; bytes are linear in the position,
    so the run's average tok/s is bandwidth / (weights + KV at the mean context)."""
    mean_ctx = (start_ctx + end_ctx) / 2
    return bandwidth_gbs * 1e9 / (weight_bytes + kv_bytes_per_token * mean_ctx)


def protocol_bound(gpu: str, precision: str, context: int) -> float:
    """The protocols.md table: nominal bandwidth, 14.20 / 4.61 GB per token, 0.5 MiB KV, 258 -> context."""
    return bound_tok_s(
        PROTOCOL_PEAK_GBS[gpu], PROTOCOL_READ_GB[precision] * 1e9, PROTOCOL_KV_BYTES, PROTOCOL_IMAGE_TOKENS, context
    )


def nominal_peak_gbs(device_name: str) -> float | None:
    return next((v for k, v in NOMINAL_PEAK_GBS if k in device_name), None)


def downsample(values: Sequence[float], max_points: int = 400) -> tuple[list[float], list[float]]:
    """(bucket centre positions, bucket means): keeps the report small, plots stay faithful."""
    n = len(values)
    if n <= max_points:
        return [float(i) for i in range(n)], [float(v) for v in values]
    edges = np.linspace(0, n, max_points + 1).astype(int)
    arr = np.asarray(values, dtype=float)
    pos = [float((a + b - 1) / 2) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return pos, [float(arr[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)]


# ------------------------------------------------------------------------------------ weight accounting
@dataclass
class WeightAccounting:
    float_params: int  # parameters of the float model (a quantized linear counts in x out)
    linear_params: int  # the 5 x n_layers block linears
    linear_bytes: int  # their weight bytes (float weight, or qweight + qzeros + scales)
    checkpoint_bytes: int  # every tensor of the state dict (official format)
    resident_bytes: int  # plus backend caches (the int4 kernel's repacked weight, a dequant float copy)
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
    checkpoint = resident = 0
    for mod in model.modules():
        if _is_quant(mod):
            float_params += mod.in_features * mod.out_features + mod.out_features
            for v in getattr(mod, "_cache", {}).values():
                if isinstance(v, torch.Tensor) and v.device.type != "meta":
                    resident += _nbytes(v)
        else:
            float_params += sum(p.numel() for p in mod.parameters(recurse=False))
    for v in model.state_dict(keep_vars=True).values():
        key = id(v) if v.device.type == "meta" else v.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        checkpoint += _nbytes(v)
    resident += checkpoint
    kv_item = t.wte.weight.element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads) * kv_item
    return WeightAccounting(float_params, linear_params, linear_bytes, checkpoint, resident, read, kv)


# ------------------------------------------------------------------------------------ random models
def _fill_random(name: str, p: torch.Tensor, config: Any, g: torch.Generator) -> None:
    """Initialise one tensor in place, on its device (same rules as qvlq.checkpoint's init)."""
    from .model.vision import sincos_pos_embed_2d

    if name.endswith("attn_pool.pos_embed"):
        p.copy_(sincos_pos_embed_2d(p.shape[1], int(round(p.shape[0] ** 0.5))))
        return
    norms = (".ln_1.", ".ln_2.", "ln_f.", "ln_pre.", "ln_post.", "ln_q.", "ln_kv.")
    if any(n in name for n in norms):
        p.fill_(1.0 if name.endswith("weight") else 0.0)
        return
    if name.endswith("bias"):
        p.zero_()
        return
    std = float(config.initializer_range)
    if name.endswith("visual.positional_embedding"):
        std = p.shape[1] ** -0.5
    elif name.endswith("visual.proj"):
        std = p.shape[0] ** -0.5
    elif name.startswith("transformer.h.") and name.endswith("c_proj.weight"):
        std = std / (2 * config.num_hidden_layers) ** 0.5
    p.normal_(0.0, std, generator=g)


def build_random_model(size: str, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A Qwen-VL-Chat with seeded random weights allocated and generated on `device` (no disk, no host copy)."""
    from .checkpoint import preset_config
    from .model.modeling import QWenLMHeadModel

    config = preset_config(size)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill_random(name, p, config, g)
    model.requires_grad_(False)
    model.eval()
    model.config.dtype = dtype
    model.name_or_path = f"random:{size}"
    return model


def rtn_quantize(
    w: torch.Tensor, bits: int = 4, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric codes of W [out, in] (qvlq.gptq.round_to_nearest, the RTN of the
    quantize baseline): codes uint8 [out, in], scales fp32 [G, out], zeros int32 [G, out], g_idx int32."""
    from .gptq import QuantSpec, round_to_nearest

    r = round_to_nearest(w, QuantSpec(bits=bits, group_size=group_size))
    return r.codes, r.scales, r.zeros, r.g_idx


def quantize_model_rtn(
    model: Any, bits: int = 4, group_size: int = 128, dtype: torch.dtype = torch.float16, backend: str = "auto"
) -> dict[str, int]:
    """Turn a float model into the official Int4 layout in place, one linear at a time (peak memory:
    the float model plus one layer's temporaries): RTN codes packed by qvlq.int4.pack_gptq_v1 into
    QuantLinear buffers, prepared for `backend`; the other weights cast to `dtype` (the official Int4
    checkpoint keeps them fp16). Returns how many layers each backend serves."""
    from .int4 import QuantLinear, pack_gptq_v1

    backends: dict[str, int] = {}
    with torch.no_grad():
        for block in model.transformer.h:
            for name in QUANTIZED_LINEARS:
                parent_name, attr = name.split(".")
                parent = getattr(block, parent_name)
                lin = getattr(parent, attr)
                codes, scales, zeros, g_idx = rtn_quantize(lin.weight, bits, group_size)
                packed = pack_gptq_v1(codes, scales, zeros, g_idx, bits=bits)
                del codes, scales, zeros
                ql = QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group_size,
                                 device=lin.weight.device)  # fmt: skip
                for k, v in packed.items():
                    getattr(ql, k).copy_(v)
                if lin.bias is not None:
                    ql.bias.copy_(lin.bias)
                del packed
                setattr(parent, attr, ql)
                del lin
                # torch's int4 kernels need whole groups; a ragged tiny layer falls back to dequant
                # lean: the device keeps only the kernel's copy of the weight (memory as the seed measures it)
                ql.prepare(backend if ql.in_features % group_size == 0 else "dequant", lean=ql.bias.is_cuda)
                backends[ql.backend] = backends.get(ql.backend, 0) + 1
        for p in model.parameters():  # QuantLinear holds buffers only, so its caches are untouched
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    cfg = model.config
    cfg.quantization_config = {
        "bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
        "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
        "quant_method": "gptq",
    }  # fmt: skip
    cfg.bf16, cfg.fp16, cfg.fp32 = dtype == torch.bfloat16, dtype == torch.float16, dtype == torch.float32
    cfg.dtype = dtype
    return backends


def int4_backends(model: nn.Module) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in model.modules():
        if _is_quant(m):
            out[m.backend] = out.get(m.backend, 0) + 1
    return out


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


# ------------------------------------------------------------------------------------ devices
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Give freed device memory back between cells (gc first: engines can sit in reference cycles)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_bandwidth(device: torch.device, nbytes: int | None = None, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (= 2 * bytes / time: every byte is read and written)."""
    if device.type == "cuda":
        if nbytes is None:
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(2 * 2**30, free // 4))
        src = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(end) / 1e3 / iters
        del src, dst
        free_memory(device)
    else:
        nbytes = nbytes or 64 * 2**20
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        times = []
        for _ in range(max(3, iters // 3)):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
        seconds = min(times)
    return 2 * nbytes / seconds / 1e9


@dataclass
class NvmlProbe:
    """NVML access for one CUDA device; every reading is None (rendered "n/a") when unavailable."""

    status: str  # "ok" or "n/a: <reason>"
    handle: Any = None
    module: Any = None
    driver: str | None = None

    def device_used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.module.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def process_used(self, pid: int) -> int | None:
        """This process's memory as NVML sees it; None when NVML cannot attribute it (container PID
        namespaces hide our pid, some drivers report no per-process usage)."""
        if self.handle is None:
            return None
        try:
            for p in self.module.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if p.pid == pid and p.usedGpuMemory is not None:
                    return int(p.usedGpuMemory)
        except Exception:
            return None
        return None


def probe_nvml(device: torch.device) -> NvmlProbe:
    if device.type != "cuda":
        return NvmlProbe("n/a: not a CUDA device")
    try:
        nvml = importlib.import_module("pynvml")  # nvidia-ml-py
        nvml.nvmlInit()
    except Exception as e:  # not installed, no driver library, no permission...
        return NvmlProbe(f"n/a: NVML unavailable ({type(e).__name__}: {str(e)[:80]})")
    handle = None
    with contextlib.suppress(Exception):  # the UUID survives CUDA_VISIBLE_DEVICES remapping
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    if handle is None:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except Exception as e:
            return NvmlProbe(f"n/a: no NVML handle for {device} ({type(e).__name__})")
    driver = None
    with contextlib.suppress(Exception):
        d = nvml.nvmlSystemGetDriverVersion()
        driver = d.decode() if isinstance(d, bytes) else str(d)
    return NvmlProbe("ok", handle, nvml, driver)


def host_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


@dataclass
class MemoryReading:
    allocated: int | None = None
    reserved: int | None = None
    nvml_process: int | None = None
    nvml_device: int | None = None
    host_rss: int | None = None


class MemorySampler:
    """Peak memory over a block: torch allocator peaks (reset on entry) plus NVML process/device and host
    RSS sampled by a background thread (sleeping between samples, so it barely touches the GIL)."""

    def __init__(self, device: torch.device, nvml: NvmlProbe, interval_s: float = 0.05) -> None:
        self.device, self.nvml, self.interval = device, nvml, interval_s
        self.reading = MemoryReading()
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        r = self.reading
        rss = host_rss()
        r.host_rss = max(r.host_rss or 0, rss)
        proc, dev = self.nvml.process_used(self._pid), self.nvml.device_used()
        if proc is not None:
            r.nvml_process = max(r.nvml_process or 0, proc)
        if dev is not None:
            r.nvml_device = max(r.nvml_device or 0, dev)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        free_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="qvlq-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(Exception):
            sync(self.device)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        if self.device.type == "cuda":
            self.reading.allocated = int(torch.cuda.max_memory_allocated(self.device))
            self.reading.reserved = int(torch.cuda.max_memory_reserved(self.device))


# ------------------------------------------------------------------------------------ timing
class _CudaTimer:
    """Events recorded per token, read after one synchronize at the end (no host syncs in the loop)."""

    def __init__(self, n_marks: int, device: torch.device) -> None:
        self.device = device
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(n_marks + 1)]
        self.i = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        self.events[0].record()
        self.i = 1

    def mark(self) -> None:
        self.events[self.i].record()
        self.i += 1

    def finish(self) -> list[float]:
        torch.cuda.synchronize(self.device)
        e0 = self.events[0]
        return [e0.elapsed_time(e) for e in self.events[1 : self.i]]


class _CpuTimer:
    def __init__(self, n_marks: int, device: torch.device) -> None:
        self.t0 = 0.0
        self.marks: list[float] = []

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def mark(self) -> None:
        self.marks.append(time.perf_counter())

    def finish(self) -> list[float]:
        return [(t - self.t0) * 1e3 for t in self.marks]


@dataclass
class RunTiming:
    prompt_tokens: int
    tokens: list[int]
    marks_ms: list[float]  # time from the request to each generated token (the first = TTFT)
    aborted: bool = False

    @property
    def ttft_ms(self) -> float:
        return self.marks_ms[0]

    @property
    def latencies_ms(self) -> list[float]:
        m = self.marks_ms
        return [b - a for a, b in zip(m[:-1], m[1:], strict=True)]

    @property
    def decode_tok_s(self) -> float | None:
        if len(self.marks_ms) < 2:
            return None
        return (len(self.marks_ms) - 1) / ((self.marks_ms[-1] - self.marks_ms[0]) / 1e3)

    @property
    def e2e_tok_s(self) -> float:
        return len(self.marks_ms) / (self.marks_ms[-1] / 1e3)

    @property
    def steady_tok_s(self) -> float | None:
        """1 / median step latency: ignores a first step that compiles or captures a graph."""
        lat = self.latencies_ms
        return 1e3 / statistics.median(lat) if lat else None


def timed_generate(
    engine: Any, ids: torch.Tensor, pixels: torch.Tensor | None, n_new: int, device: torch.device,
    deadline: float | None = None,
) -> RunTiming:
    """Greedy generation of exactly n_new tokens (EOS ignored), timestamped per token. Tokens stay on
    the device until the end; past `deadline` (time.monotonic) the run stops early (aborted=True)."""
    timer = (_CudaTimer if device.type == "cuda" else _CpuTimer)(n_new, device)
    aborted = False
    with torch.no_grad():
        engine.reset()
        timer.start()
        tok = engine.prefill(ids, images=pixels).argmax(-1)
        timer.mark()
        toks = [tok]
        for _ in range(n_new - 1):
            if deadline is not None and time.monotonic() > deadline:
                aborted = True
                break
            tok = engine.step(tok).argmax(-1)
            timer.mark()
            toks.append(tok)
        marks = timer.finish()
        tokens = torch.cat(toks).tolist()
    return RunTiming(int(ids.shape[1]), tokens, marks, aborted)


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
    int4_selection: list[dict[str, Any]] = field(default_factory=list)  # qvlq.int4.kernel_selection()


@dataclass
class CrossCheck:
    precision: str
    context: int
    engines: list[str]
    compared: int
    agree: int
    first_divergence: int | None
    note: str = ""


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
        from .int4 import BACKENDS

        if self.int4_kernel not in BACKENDS:
            raise ProfileRefused(f"--int4-kernel must be one of {', '.join(BACKENDS)}, got {self.int4_kernel!r}")
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
        out = []
        if len(self.s.engines) < 2:
            return out
        a, b = self.s.engines[:2]
        precs = list(dict.fromkeys(m.precision for m in self.models))
        for prec in precs:
            for c in self.s.contexts:
                ta, tb = self.first_tokens.get((prec, a, c)), self.first_tokens.get((prec, b, c))
                if ta is None or tb is None:
                    continue
                n = min(len(ta), len(tb))
                agree = sum(x == y for x, y in zip(ta[:n], tb[:n], strict=True))
                first = next((i for i in range(n) if ta[i] != tb[i]), None)
                note = "identical" if first is None else (
                    "diverge after a near-tie is expected in 16-bit (random weights make ties common)"
                )
                out.append(CrossCheck(prec, c, [a, b], n, agree, first, note))
        return out


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
        resident_bytes=acc.resident_bytes, bits_per_weight_linears=acc.bits_per_weight_linears,
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
    if device.type != "cuda" and s.int4_kernel in ("int4_cuda", "triton", "mma"):
        raise ProfileRefused(f"--int4-kernel {s.int4_kernel} needs a CUDA device; on {device} use fastest, auto or "
                             "dequant")  # fmt: skip
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # events and streams follow the current device
    started = datetime.now().isoformat(timespec="seconds")

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
        info, acc = _model_info(model, v.precision, v.source, v.random_weights, time.monotonic() - t0, disk)
        prof.models.append(info)
        log(
            f"{v.precision}: {info.weight_bytes / 1e9:.2f} GB weights, {acc.read_bytes_per_token / 1e9:.3f} GB read "
            f"per token, int4 kernels {info.int4_backends or '-'} (built in {info.build_seconds:.1f} s)"
        )
        prof.profile_model(model, info, acc, tokenizer, pixels, image_tokens, deadline)
        info.resident_bytes = weight_accounting(model).resident_bytes  # lazily built kernel caches included
        free_memory(device)
    del model
    free_memory(device)

    notes = report_notes(s, env, prof.bandwidth, P, image_tokens)
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
    if s.windowed:
        notes.append(
            "Windowed cells (" + ", ".join(f"{e}@{c}" for e, c in s.windowed) + f"): the decode rate is estimated "
            f"from {s.window_points} windows of {s.window_tokens} tokens after prefills to positions spread over the "
            "run (mean latency interpolated over all positions); their 'generate' memory is the last window's."
        )
    if s.max_seconds:
        notes.append(f"Time budget {s.max_seconds:.0f} s: cells that would not fit are reported as skipped.")
    return notes


# ------------------------------------------------------------------------------------ rendering
def fmt(x: float | None, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{nd}f}"


def gb(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def _speed(report: ProfileReport, prec: str, eng: str, ctx: int) -> SpeedCell | None:
    return next((c for c in report.speed if (c.precision, c.engine, c.context) == (prec, eng, ctx)), None)


def _mem(report: ProfileReport, prec: str, eng: str, cell: str) -> MemoryCell | None:
    return next((m for m in report.memory if (m.precision, m.engine, m.cell) == (prec, eng, cell)), None)


def _speed_text(c: SpeedCell | None) -> str:
    if c is None:
        return "-"
    if c.decode_tok_s is None:
        return c.status
    mark = "~" if c.mode == "windowed" else ""
    flag = "" if c.status == "ok" else " *"
    return f"{mark}{c.decode_tok_s:.1f} / {mark}{c.e2e_tok_s:.1f}{flag}"


def _mem_text(m: MemoryCell | None) -> str:
    if m is None:
        return "-"
    if m.allocated_bytes is None and m.host_rss_bytes is None:
        return m.status
    if m.allocated_bytes is None:  # CPU: host RSS is the only figure
        return f"RSS {gb(m.host_rss_bytes)}"
    return f"{gb(m.allocated_bytes)} / {gb(m.nvml_process_bytes)}"


def report_tables(report: ProfileReport) -> list[TableSpec]:
    s = report.settings
    ctxs: list[int] = s["contexts"]
    cmin, cmax = min(ctxs), max(ctxs)
    rows_pe = list(dict.fromkeys((c.precision, c.engine) for c in report.speed))
    on_gpu = report.environment.device.startswith("cuda")
    mem_unit = "alloc / NVML proc GB" if on_gpu else "host RSS GB"

    main = TableSpec(
        f"Qwen-VL-Chat speed and memory ({report.environment.device_name})",
        ["precision", "engine"] + [f"tok/s @{c} (decode / e2e)" for c in ctxs]
        + [f"peak encode {cmin} ({mem_unit})", f"peak generate {cmax} ({mem_unit})"],
        [],
        "~ = windowed estimate; * = see status in the detail table. Seed rows: the README's A100 figures.",
    )
    for prec, eng in rows_pe:
        main.rows.append([prec, eng] + [_speed_text(_speed(report, prec, eng, c)) for c in ctxs]
                         + [_mem_text(_mem(report, prec, eng, f"encode {cmin}")),
                            _mem_text(_mem(report, prec, eng, f"generate {cmax}"))])  # fmt: skip
    if {2048, 8192} <= set(ctxs):
        for prec, ref in report.seed_reference.items():
            main.rows.append([f"{prec} (seed)", "A100 HF"] + [
                f"{ref[f'tok_s@{c}']:.2f}" if f"tok_s@{c}" in ref else "-" for c in ctxs
            ] + [f"{ref['peak_gb@encode 2048']:.2f}" if cmin == 2048 else "-",
                 f"{ref['peak_gb@generate 8192']:.2f}" if cmax == 8192 else "-"])  # fmt: skip
    tables = [main]
    if not {2048, 8192} <= set(ctxs):
        tables.append(TableSpec(
            "Seed reference (Qwen-VL README, A100-SXM4-80G, HF)",
            ["precision", "tok/s @2048", "tok/s @8192", "peak GB encode 2048", "peak GB generate 8192"],
            [[p, *(f"{r[k]:.2f}" for k in ("tok_s@2048", "tok_s@8192", "peak_gb@encode 2048",
                                            "peak_gb@generate 8192"))] for p, r in report.seed_reference.items()],
        ))  # fmt: skip

    detail = TableSpec(
        "Speed detail",
        ["precision", "engine", "ctx", "mode", "runs", "prompt", "new", "TTFT ms", "prefill tok/s", "decode tok/s",
         "+-sd", "e2e tok/s", "p50 ms", "p90 ms", "p99 ms", "sd ms", "bound tok/s", "% bound", "eff GB/s", "status"],
        [],
    )  # fmt: skip
    for c in report.speed:
        lat = c.latency
        detail.rows.append([
            c.precision, c.engine, str(c.context), c.mode, f"{c.runs}/{c.runs_planned}", str(c.prompt_tokens),
            str(c.new_tokens), fmt(c.ttft_ms, 0), fmt(c.prefill_tok_s, 0), fmt(c.decode_tok_s, 2),
            fmt(c.decode_tok_s_stdev, 2), fmt(c.e2e_tok_s, 2), fmt(lat and lat.p50_ms, 2), fmt(lat and lat.p90_ms, 2),
            fmt(lat and lat.p99_ms, 2), fmt(lat and lat.stdev_ms, 2), fmt(c.bound_tok_s, 0), fmt(c.pct_of_bound, 1),
            fmt(c.effective_gbs, 0 if (c.effective_gbs or 0) >= 100 else 2),
            c.status + (f" ({c.note})" if c.note else ""),
        ])  # fmt: skip
    tables.append(detail)

    mem = TableSpec(
        "Peak memory (GB = 1e9 bytes)",
        ["precision", "engine", "cell", "torch alloc", "torch reserved", "NVML process", "NVML device", "host RSS",
         "s", "status"],
        [[m.precision, m.engine, m.cell, gb(m.allocated_bytes), gb(m.reserved_bytes), gb(m.nvml_process_bytes),
          gb(m.nvml_device_bytes), gb(m.host_rss_bytes), fmt(m.seconds, 1), m.status + (f" ({m.note})" if m.note
          else "")] for m in report.memory],
    )  # fmt: skip
    tables.append(mem)

    models = TableSpec(
        "Models",
        ["precision", "source", "dtype", "params (float)", "weights GB", "resident GB", "bits/w linears",
         "bits/w overall", "read GB/token", "KV KiB/token", "int4 kernels", "build s"],
        [[m.precision, m.source + (" (RANDOM)" if m.random_weights else ""), m.dtype, f"{m.float_params:,}",
          f"{gb(m.weight_bytes)} {m.weight_bytes_kind}", gb(m.resident_bytes), f"{m.bits_per_weight_linears:.3f}",
          f"{m.bits_per_weight_overall:.3f}", f"{m.read_bytes_per_token / 1e9:.3f}",
          f"{m.kv_bytes_per_token / 1024:.1f}", ", ".join(f"{k} x{v}" for k, v in m.int4_backends.items()) or "-",
          fmt(m.build_seconds, 1)] for m in report.models],
    )  # fmt: skip
    tables.append(models)

    if report.crosschecks:
        tables.append(TableSpec(
            "Greedy cross-check (first tokens of both engines, same weights and prompt)",
            ["precision", "ctx", "engines", "agree", "first divergence", "note"],
            [[x.precision, str(x.context), " vs ".join(x.engines), f"{x.agree}/{x.compared}",
              "-" if x.first_divergence is None else str(x.first_divergence), x.note] for x in report.crosschecks],
        ))  # fmt: skip
    if report.engines:
        tables.append(TableSpec(
            "Engines (describe())", ["cell", "description"],
            [[k, ", ".join(f"{a}={b}" for a, b in v.items())] for k, v in report.engines.items()],
        ))  # fmt: skip
    e = report.environment
    env_rows = [
        ["device", f"{e.device} ({e.device_name}, cc {e.compute_capability or '-'}, {gb(e.device_memory_bytes)} GB)"],
        ["driver / CUDA", f"{e.driver or 'n/a'} / {e.cuda or 'n/a'}"],
        ["torch / transformers / qvlq", f"{e.torch} / {e.transformers} / {e.qvlq}"],
        ["python", e.python], ["CPU", f"{e.cpu} ({e.cpu_threads} threads, torch uses {e.torch_threads})"],
        ["NVML", e.nvml],
        ["bandwidth", f"{report.bandwidth_gbs:.0f} GB/s measured (device copy)"
         + (f"; nominal peak {report.nominal_peak_gbs:.0f} GB/s" if report.nominal_peak_gbs else "")],
        ["int4 kernels", ("; ".join(f"{m.precision}: {m.int4_backends}" for m in report.models if m.int4_backends)
                          + f" (requested: {s.get('int4_kernel', 'auto')})")
         if any(m.int4_backends for m in report.models) else "-"],
        *([["int4 kernel choice", "; ".join(_selection_text(c) for m in report.models for c in m.int4_selection)]]
          if any(m.int4_selection for m in report.models) else []),
        ["fast engine compile", s.get("fast_compile", "auto") + (f", kv_block {s['kv_block']}" if s.get("kv_block")
                                                                 else "")],
        ["fast engine attention", f"requested {s.get('attention', 'sdpa')}; "
         + ("; ".join(f"{k}: {v.get('attention')}" for k, v in report.engines.items() if v.get("engine") == "fast")
            or "-")],
        ["weights", "RANDOM (" + str(s["random_weights"]) + " geometry)" if s.get("random_weights") else "checkpoint"],
        ["started / wall time", f"{report.started} / {report.seconds:.0f} s"],
    ]  # fmt: skip
    tables.append(TableSpec("Environment", ["", ""], env_rows))
    return tables


def _selection_text(c: dict[str, Any]) -> str:
    """One measured int4 kernel choice: shape, timings at one row, the winner."""
    parts = []
    for kernel in ("int4_cuda", "triton", "mma"):
        if f"{kernel}_us" in c:
            cfg = f" [{c[f'{kernel}_config']}]" if f"{kernel}_config" in c else ""
            parts.append(f"{kernel} {c[f'{kernel}_us']:.1f} us{cfg}")
    return f"{c['in_features']}->{c['out_features']}: {', '.join(parts)} -> {c['choice']}"


def render_markdown(report: ProfileReport, tables: list[TableSpec], figures: Sequence[str] = ()) -> str:
    lines = [f"# qvlq profile: {report.environment.device_name}", ""]
    lines += [f"- {md_escape(n)}" for n in report.notes] + [""]
    lines += markdown_tables(tables)
    for f in figures:
        lines += [f"![{f}]({f})", ""]
    return "\n".join(lines)


def plot_speed(report: ProfileReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctxs = report.settings["contexts"]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(6 * len(ctxs), 4.2), squeeze=False)
    for ax, ctx in zip(axes[0], ctxs, strict=True):
        for c in (c for c in report.speed if c.context == ctx and c.series_latency_ms):
            lat = np.asarray(c.series_latency_ms)
            label = f"{c.precision}/{c.engine}" + (" (windows)" if c.mode == "windowed" else "")
            if c.mode == "windowed":
                ax.plot(c.series_position, 1e3 / lat, "o--", label=label)
            else:
                k = max(1, len(lat) // 50)  # light smoothing of the (already bucketed) series
                smooth = np.convolve(lat, np.ones(k) / k, mode="valid")
                ax.plot(c.series_position[k - 1 :], 1e3 / smooth, label=label)
        ax.set_title(f"context {ctx}: decode speed along the generation")
        ax.set_xlabel("generated token")
        ax.set_ylabel("tok/s (1 / per-token latency)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.environment.device_name}" + (" - RANDOM weights" if report.settings.get("random_weights")
                                                       else ""))  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_memory(report: ProfileReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [m for m in report.memory if any(v is not None for v in (m.allocated_bytes, m.host_rss_bytes))]
    series = [("torch alloc", "allocated_bytes"), ("torch reserved", "reserved_bytes"),
              ("NVML process", "nvml_process_bytes"), ("NVML device", "nvml_device_bytes"),
              ("host RSS", "host_rss_bytes")]  # fmt: skip
    series = [(n, a) for n, a in series if any(getattr(m, a) is not None for m in cells)]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(cells) + 2), 4.5))
    x = np.arange(len(cells))
    w = 0.8 / max(len(series), 1)
    for i, (name, attr) in enumerate(series):
        vals = [(getattr(m, attr) or 0) / 1e9 for m in cells]
        ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, label=name)
    ax.set_xticks(x, [f"{m.precision}/{m.engine}\n{m.cell}" for m in cells], fontsize=7)
    ax.set_ylabel("peak GB (1e9 bytes)")
    ax.set_title(f"Peak memory - {report.environment.device_name}")
    ax.grid(axis="y", alpha=0.3)
    if series:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_json(report: ProfileReport) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(report), default=str))


def default_out_dir(device: str | torch.device | None = None) -> Path:
    """reports/profile/<device-slug>-<date>/ for the device a profile runs on."""
    from .model.loading import resolve_device

    d = resolve_device(device)
    name = torch.cuda.get_device_name(d) if d.type == "cuda" and torch.cuda.is_available() else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return Path("reports") / "profile" / f"{slug}-{datetime.now():%Y-%m-%d}"


def check_out_dir(out: str | os.PathLike | None, device: str | None, overwrite: bool) -> Path:
    """The report directory, refused before any work if it exists and overwrite is off."""
    from .io import OutputExistsError

    path = Path(out) if out is not None else default_out_dir(device)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass --overwrite to replace it)")
    return path


def write_report(report: ProfileReport, out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """report.json, report.md, report.svg, speed.png and memory.png, written atomically into `out`."""
    from .io import atomic_dir, atomic_write_text

    out = Path(out) if out is not None else default_out_dir(report.settings.get("device"))
    tables = report_tables(report)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        atomic_write_text(tmp / "report.json", json.dumps(report_json(report), indent=2) + "\n")
        plot_speed(report, tmp / "speed.png")
        plot_memory(report, tmp / "memory.png")
        atomic_write_text(tmp / "report.md", render_markdown(report, tables, ["speed.png", "memory.png"]))
        save_tables_svg(tmp / "report.svg", tables, report.notes, title="qvlq profile")
    return out


__all__ = [
    "CrossCheck", "Environment", "LatencyStats", "MemoryCell", "ModelInfo", "ProfileRefused", "ProfileReport",
    "ProfileSettings", "SpeedCell", "WeightAccounting", "bound_tok_s", "build_random_model", "latency_stats",
    "measure_bandwidth", "percentile", "probe_nvml", "protocol_bound", "quantize_model_rtn", "report_tables",
    "rtn_quantize", "run_profile", "timed_generate", "weight_accounting", "write_report",
]  # fmt: skip
