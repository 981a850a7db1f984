"""How qvlq measures a decode run: latency statistics, the bandwidth bound, the device's copy bandwidth,
peak memory (torch allocator, NVML process and device, host RSS: sampled by a thread) and per-token
timestamps (CUDA events read once at the end, so the loop has no host sync).

Used by `qvlq profile` (qvlq.profile) and by the GPU benchmarks.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


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


def downsample(values: Sequence[float], max_points: int = 400) -> tuple[list[float], list[float]]:
    """(bucket centre positions, bucket means): keeps the report small, plots stay faithful."""
    n = len(values)
    if n <= max_points:
        return [float(i) for i in range(n)], [float(v) for v in values]
    edges = np.linspace(0, n, max_points + 1).astype(int)
    arr = np.asarray(values, dtype=float)
    pos = [float((a + b - 1) / 2) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    return pos, [float(arr[a:b].mean()) for a, b in zip(edges[:-1], edges[1:], strict=True)]


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
