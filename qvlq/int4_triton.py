"""A Triton int4 GEMV for batch-1 decoding: y[M, N] = x[M, K] @ W[K, N] with GPTQ 4-bit weights.

Why: at M=1 a linear layer is a pure weight stream (0.5 byte per weight), so the kernel should run at
the HBM copy bandwidth. torch's tinygemm (`aten._weight_int4pack_mm`) reaches about a third of it on an
H200 at M=1. This kernel is a plain streaming GEMV with a handful of tunable configurations; `tune()`
picks the fastest per shape on the GPU (timed in a CUDA graph, as it runs inside the decode step).
Measured on an H200 (reports/int4/, the kernel before the 1 + q/16 placement below): exact, but 19-30% of
the copy bandwidth vs tinygemm's 32-42%, i.e. 0.62-0.75x its speed: compute-bound at ~6.1 SASS instructions
per weight in its main loop. Now ~5.0 on sm_80 and sm_90 (a test counts them in the compiled loop); its speed
is unmeasured since. It stays opt-in (QuantLinear "triton", or "fastest" to time it per shape); qvlq.int4_mma
is the tensor-core kernel (~1.8 instructions per weight).

Layout (`pack`), for group size gs, K/8 packed rows, WPG = gs/8 words per group and column:
    qweight int32 [K/8, N]   row g*WPG + j, column n holds the codes of k = g*gs + i*WPG + j at bits
                             4i..4i+3 (i = 0..7): nibble i of the words of one group covers a contiguous
                             run of WPG inputs, so the kernel reads x for nibble i as one contiguous slice
    scales  fp16 [G, N]      as in the checkpoint (fp32 only if the given scales are not fp16 values)
    zeros   uint8 [G, N]     the real zero point (GPTQ v1 stored value + 1)
    W[k, n] = scales[g, n] * (q[k, n] - zeros[g, n]),  g = k // gs  (inputs in group-contiguous order;
    act-order checkpoints are handled by the caller permuting x, see qvlq.int4.QuantLinear).
Rows are contiguous along N, so a program reading BLOCK_N columns of a few packed rows issues
BLOCK_N*4-byte contiguous runs with 16-byte vector loads (4 columns per thread).

Kernel math per group, in fp32: code q moved into mantissa bits 19..22 of 1.0 reads as f = 1 + q/16 exactly
(one shift and one and-or, LOP3, a code: an integer->float convert is a quarter-rate instruction); dot =
sum x_i f_i over the group's codes (one FFMA each), xsum = sum x_i, and sum x_i (q_i - z) = 16 dot - (16 + z)
xsum, scaled by s into a per-element accumulator that is reduced once at the end of the program. The
subtraction costs ~2 bits of the fp32 sum (relative error ~4e-7 against an fp64 reference, vs ~1.5e-7 when
z was subtracted per code): far below a bf16/fp16 output's rounding.

Split-K (more programs for N=4096): "sem" is one kernel: every program writes its fp32 partial, bumps
a per-(row, column block) counter; the last one of the SPLIT_K sums the partials in a fixed order,
writes y and resets the counter to 0, so the counters (zeroed once, shared by all layers) stay zero
between calls and no memset kernel is needed. "atomic" is the textbook variant (zeroed fp32 buffer,
atomic adds, cast): three kernels, kept for comparison.

Triton is optional: nothing here imports it until a kernel is launched on CUDA or under
TRITON_INTERPRET=1; on the CPU the custom op runs the torch reference.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qvlq.tuning import remember_tune

COUNTERS = 1 << 16  # int32 slots of the shared split-K counter buffer (rows x column blocks per call)


class Packed(NamedTuple):
    """The kernel's copy of one linear layer (see the module docstring)."""

    qweight: Tensor  # int32 [K/8, N]
    scales: Tensor  # fp16 (or fp32) [G, N]
    zeros: Tensor  # uint8 [G, N]
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 8

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


class Config(NamedTuple):
    """One kernel configuration. A program covers block_n outputs and groups_per_iter groups per loop step
    (block_n * groups_per_iter * gs/8 words, ~16 per thread); split_k programs share the K range."""

    block_n: int
    groups_per_iter: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    mode: str = "direct"  # "direct" (split_k 1), "sem" (one kernel) or "atomic" (memset + kernel + cast)

    @property
    def name(self) -> str:
        split = "" if self.split_k == 1 else f"-k{self.split_k}{self.mode}"
        return f"n{self.block_n}g{self.groups_per_iter}w{self.num_warps}s{self.num_stages}{split}"


# Sized for gs=128 (16 words per group and column); ~16 words per thread keeps registers < 128.
CONFIGS: tuple[Config, ...] = (
    # one kernel, parallel over N only
    Config(16, 4, 4, 2),
    Config(32, 2, 4, 3),
    Config(32, 4, 4, 2),
    Config(64, 2, 4, 2),
    Config(64, 4, 8, 2),
    Config(128, 1, 4, 4),
    Config(128, 2, 8, 3),
    Config(256, 1, 8, 3),
    # one kernel, split-K reduced by the last program of each column block
    Config(32, 4, 4, 2, 2, "sem"),
    Config(64, 2, 4, 2, 2, "sem"),
    Config(64, 2, 4, 2, 4, "sem"),
    Config(128, 1, 4, 3, 4, "sem"),
    Config(128, 2, 8, 2, 8, "sem"),
    Config(256, 1, 8, 2, 8, "sem"),
    # split-K with fp32 atomics (three kernels)
    Config(128, 1, 4, 3, 4, "atomic"),
    Config(64, 2, 4, 2, 8, "atomic"),
)
DEFAULT_CONFIG = Config(64, 2, 4, 2)  # used untuned (CPU reference path, or before tuning)


# ------------------------------------------------------------------------------------------ packing
def check_group_size(in_features: int, group_size: int) -> str | None:
    """None if the kernel can serve this (K, group size), else why not."""
    gs = in_features if group_size == -1 else group_size
    if gs < 16 or gs & (gs - 1):
        return f"group size {gs} must be a power of two >= 16 (the kernel tiles gs/8 words with tl.arange)"
    if in_features % gs:
        return f"in_features {in_features} is not a multiple of the group size {gs}"
    return None


def check_values(codes: Tensor, zeros: Tensor, scales: Tensor, gs: int, max_zero: int, why: str = "") -> int:
    """Shapes and value ranges of a kernel packer's input (codes [N, K], zeros and scales [G, N]); G."""
    n, k = codes.shape
    g = k // gs
    if tuple(zeros.shape) != (g, n) or tuple(scales.shape) != (g, n):
        raise ValueError(f"zeros {tuple(zeros.shape)} and scales {tuple(scales.shape)} must be [{g}, {n}]")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("codes must be 4-bit values in [0, 15]")
    if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > max_zero):
        raise ValueError(f"zero points must lie in [0, {max_zero}]{why}")
    return g


def pack(codes: Tensor, zeros: Tensor, scales: Tensor, group_size: int) -> Packed:
    """codes uint8 [N, K] (inputs in group-contiguous order: group g = k // gs), zeros [G, N] (the real zero
    point), scales [G, N] fp16/fp32 -> the kernel's layout. Exact: scales stay fp16 when they are fp16
    values, else fp32."""
    n, k = codes.shape
    gs = k if group_size == -1 else group_size
    reason = check_group_size(k, gs)
    if reason is not None:
        raise ValueError(reason)
    g = check_values(codes, zeros, scales, gs, max_zero=255)
    wpg = gs // 8
    q = codes.T.to(torch.int32).reshape(g, 8, wpg, n)  # [g, i, j, n]: k = g*gs + i*wpg + j
    words = torch.zeros(g, wpg, n, dtype=torch.int32, device=codes.device)
    for i in range(8):  # int32 wraps: nibble 7 sets the sign bit, as in GPTQ's qweight
        words |= q[:, i] << (4 * i)
    s16 = scales.to(torch.float16)
    exact = torch.equal(s16.to(scales.dtype), scales)
    return Packed(
        words.reshape(k // 8, n).contiguous(),
        (s16 if exact else scales.float()).contiguous(),
        zeros.to(torch.uint8).contiguous(),
        gs,
    )


def unpack_codes(p: Packed) -> Tensor:
    """Inverse of pack's code layout: int32 [K, N] in group-contiguous input order."""
    kw, n = p.qweight.shape
    wpg = p.group_size // 8
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=p.qweight.device).view(1, 8, 1, 1)
    q = (p.qweight.view(-1, 1, wpg, n) >> shifts) & 0xF  # [g, i, j, n]
    return q.reshape(kw * 8, n)


def dequantize(p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [K, N] = s * (q - z), computed in fp32 and rounded once (the reference the kernel is checked against,
    and the dense prefill path of a lean QuantLinear). One nibble position at a time: ~1.5 bytes a weight of
    transient memory besides the result."""
    kw, n = p.qweight.shape
    g, wpg = kw * 8 // p.group_size, p.group_size // 8
    words = p.qweight.view(g, wpg, n)
    z, s = p.zeros.float().unsqueeze(1), p.scales.float().unsqueeze(1)  # [G, 1, N]
    out = torch.empty(g, 8, wpg, n, dtype=dtype, device=p.qweight.device)  # k = g*gs + i*wpg + j
    for i in range(8):
        out[:, i] = ((((words >> (4 * i)) & 0xF).float() - z) * s).to(dtype)
    return out.view(kw * 8, n)


def reference(x: Tensor, p: Packed, bias: Tensor | None = None) -> Tensor:
    """Torch implementation of the kernel's result: fp32 math, output in x's dtype."""
    y = x.float() @ dequantize(p)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------ triton
@functools.cache
def triton_error() -> str | None:
    """None if triton imports, else the reason (triton is optional: CI and CPU installs have none)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton is not importable: {type(e).__name__}: {e}"
    return None


def _fix_interpreter_scalars() -> None:
    """TRITON_INTERPRET=1 (tests, --dry-run) with numpy >= 2.4: triton 3.6's interpreter holds scalars as
    1-element arrays and converts them with int(array), which numpy 2.4 refuses, so a loop bound like
    range(pid * n, ...) fails. Re-patch __index__ to use .item()."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "qvlq_fixed", False):
        return

    def patched(tensor: Any, scope: Any) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.qvlq_fixed = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def import_triton() -> tuple[Any, Any]:
    """(triton, triton.language) for a kernel definition; under TRITON_INTERPRET=1 with the interpreter fix."""
    import triton
    import triton.language as tl

    if interpreting():
        _fix_interpreter_scalars()
    return triton, tl


@functools.cache
def _kernel() -> Any:
    """Compile-on-demand definition of the Triton kernel (imports triton)."""
    triton, tl = import_triton()

    @triton.jit
    def int4_gemv_kernel(
        x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, cnt_ptr,
        N, KW, KW_PER_SPLIT, stride_xm, stride_ym,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr, SPLIT_K: tl.constexpr,
        MODE: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    ):  # fmt: skip
        WPG: tl.constexpr = GROUP // 8  # packed rows (int32 words) per group and column
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        m = tl.program_id(2)  # M > 1: one row per program (correct, not fast: weights re-read from L2)
        n_rows = tl.num_programs(2)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        gi = tl.arange(0, GPI)  # group within a loop step
        j = tl.arange(0, WPG)  # word within a group
        kw_lo = pid_k * KW_PER_SPLIT  # the last split may run a few fully masked steps past KW
        acc = tl.zeros((GPI, WPG, BLOCK_N), dtype=tl.float32)
        for kw0 in range(kw_lo, kw_lo + KW_PER_SPLIT, GPI * WPG):
            rows = kw0 + gi[:, None] * WPG + j[None, :]  # [GPI, WPG] packed rows of this step
            row_ok = rows < KW
            # the weight tile: one wide load per step, issued before any math on it
            w = tl.load(
                w_ptr + rows[:, :, None] * N + cols[None, None, :],
                mask=row_ok[:, :, None] & col_ok[None, None, :], other=0,
            )  # fmt: skip
            g = kw0 // WPG + gi  # [GPI] group index
            gs_mask = (g * WPG < KW)[:, None] & col_ok[None, :]
            s = tl.load(s_ptr + g[:, None] * N + cols[None, :], mask=gs_mask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g[:, None] * N + cols[None, :], mask=gs_mask, other=0).to(tl.float32)
            x_row = x_ptr + m * stride_xm + g[:, None] * GROUP + j[None, :]  # [GPI, WPG]: k of nibble 0
            wu = w.to(tl.uint32, bitcast=True)  # logical shifts: no sign extension to undo
            dot = tl.zeros((GPI, WPG, BLOCK_N), dtype=tl.float32)
            xsum = tl.zeros((GPI, WPG), dtype=tl.float32)
            for i in tl.static_range(8):
                xi = tl.load(x_row + i * WPG, mask=row_ok, other=0.0).to(tl.float32)  # masked rows: x = 0
                xsum += xi
                # nibble i moved to mantissa bits 19..22 of 1.0: f = 1 + q/16 (one shift, one and-or)
                if 4 * i <= 19:
                    t = wu << (19 - 4 * i)
                else:
                    t = wu >> (4 * i - 19)
                if ASM:  # one LOP3 (ptxas for sm_80 splits `(t & mask) | one` into two, sm_90 does not)
                    t = tl.inline_asm_elementwise(
                        "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                        [t, tl.full(t.shape, 0x780000, tl.uint32), tl.full(t.shape, 0x3F800000, tl.uint32)],
                        dtype=tl.uint32, is_pure=True, pack=1,
                    )  # fmt: skip
                else:
                    t = (t & 0x780000) | 0x3F800000
                f = t.to(tl.float32, bitcast=True)
                dot += xi[:, :, None] * f
            # sum x (q - z) = 16 sum x f - (16 + z) sum x
            acc += (16.0 * s)[:, None, :] * dot - (s * (16.0 + z))[:, None, :] * xsum[:, :, None]
        part = tl.sum(tl.sum(acc, axis=1), axis=0)  # [BLOCK_N]: the one cross-thread reduction
        y_offs = m * stride_ym + cols
        if MODE == 0:  # direct
            if HAS_BIAS:
                part += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_offs, part.to(y_ptr.dtype.element_ty), mask=col_ok)
        elif MODE == 2:  # atomic into a zeroed fp32 [M, N] buffer; the caller casts and adds the bias
            tl.atomic_add(part_ptr + m * N + cols, part, mask=col_ok)
        else:  # sem: the last program of this (row, column block) reduces the partials
            tl.store(part_ptr + (pid_k * n_rows + m) * N + cols, part, mask=col_ok)
            tl.debug_barrier()  # all threads' partial stores precede the release below
            cnt = cnt_ptr + m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros((BLOCK_N,), dtype=tl.float32)
                for sk in tl.static_range(SPLIT_K):  # fixed order: deterministic result
                    total += tl.load(
                        part_ptr + (sk * n_rows + m) * N + cols, mask=col_ok, other=0.0, cache_modifier=".cg"
                    )
                if HAS_BIAS:
                    total += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(y_ptr + y_offs, total.to(y_ptr.dtype.element_ty), mask=col_ok)
                tl.atomic_xchg(cnt, 0)  # back to zero for the next call

    return int4_gemv_kernel


_MODES = {"direct": 0, "sem": 1, "atomic": 2}
_COUNTER_BUFFERS: dict[torch.device, Tensor] = {}


def counters(device: torch.device | str) -> Tensor:
    """The shared, zeroed split-K counters of a device. Create it before capturing a CUDA graph
    (QuantLinear.prepare does): the kernel leaves it zeroed, so it is allocated and cleared only once.
    Kernels on one stream run one after another, so all layers can share it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    buf = _COUNTER_BUFFERS.get(device)
    if buf is None:
        buf = _COUNTER_BUFFERS[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return buf


def launch(x: Tensor, p: Packed, bias: Tensor | None, cfg: Config, out: Tensor | None = None) -> Tensor:
    """Run the Triton kernel: x [M, K] (contiguous rows) -> y [M, N] in x's dtype. Needs triton (on CUDA,
    or on CPU tensors with TRITON_INTERPRET=1 set before triton was imported)."""
    kernel = _kernel()
    m, k = x.shape
    n, kw = p.out_features, p.qweight.shape[0]
    if k != p.in_features:
        raise ValueError(f"x has {k} features, the weight {p.in_features}")
    if x.stride(1) != 1:
        x = x.contiguous()
    wpg = p.group_size // 8
    step = cfg.groups_per_iter * wpg
    n_blocks = -(-n // cfg.block_n)
    mode, split = cfg.mode, cfg.split_k
    if split == 1 or (mode == "sem" and m * n_blocks > COUNTERS):
        mode, split = "direct", 1
    kw_per_split = -(-kw // (step * split)) * step  # whole loop steps per split
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    part = cnt = y  # unused pointers in direct mode
    if mode == "sem":
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        cnt = counters(x.device)
    elif mode == "atomic":
        part = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    has_bias = bias is not None and mode != "atomic"
    kernel[(n_blocks, split, m)](
        x, p.qweight, p.scales, p.zeros, bias if has_bias else y, y, part, cnt,
        n, kw, kw_per_split, x.stride(0), y.stride(0),
        GROUP=p.group_size, BLOCK_N=cfg.block_n, GPI=cfg.groups_per_iter, SPLIT_K=split, MODE=_MODES[mode],
        HAS_BIAS=has_bias, ASM=not interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if mode == "atomic":
        y.copy_(part if bias is None else part + bias.float())
    return y


# ------------------------------------------------------------------------------------------ custom op
# torch.compile(fullgraph=True) traces QuantLinear.forward: the launch must be opaque to dynamo.
@torch.library.custom_op("qvlq::int4_gemv", mutates_args=())
def _int4_gemv_op(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    bias: Tensor | None,
    group_size: int,
    block_n: int,
    groups_per_iter: int,
    num_warps: int,
    num_stages: int,
    split_k: int,
    mode: str,
) -> Tensor:
    p = Packed(qweight, scales, zeros, group_size)
    if x.device.type != "cuda":  # CPU: the torch reference (same math, no kernel)
        return reference(x, p, bias)
    return launch(x, p, bias, Config(block_n, groups_per_iter, num_warps, num_stages, split_k, mode))


@_int4_gemv_op.register_fake
def _(x, qweight, scales, zeros, bias, group_size, block_n, groups_per_iter, num_warps, num_stages, split_k, mode):
    return x.new_empty(x.shape[0], qweight.shape[1])


def gemv(x: Tensor, p: Packed, bias: Tensor | None = None, cfg: Config = DEFAULT_CONFIG) -> Tensor:
    """y [M, N] = x [M, K] @ W (+ bias), in x's dtype: the custom op (Triton on CUDA, reference on CPU)."""
    return torch.ops.qvlq.int4_gemv(
        x.contiguous(), p.qweight, p.scales, p.zeros, bias, p.group_size,
        cfg.block_n, cfg.groups_per_iter, cfg.num_warps, cfg.num_stages, cfg.split_k, cfg.mode,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ tuning
def time_graph(call: Callable[[int], object], calls: int = 200, repeats: int = 5) -> float:
    """Median seconds per call of call(0), call(1), ... captured in one CUDA graph: launch overhead counts
    as inside the decode step's graph. call(i) should rotate weight copies so the set exceeds L2 (as 160
    different layers do). Run call once eagerly before (compiles, allocates)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up on a side stream, as torch.cuda.graphs recommends
        for i in range(3):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i)
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return statistics.median(times)


def error_line(e: BaseException, limit: int = 300) -> str:
    """A tuner's record of why a config or kernel was dropped: the exception's type and first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:limit] if str(e) else ''}"


def copies_for_l2(nbytes: int, device: torch.device | str) -> int:
    """How many copies of an nbytes weight to rotate through so that they do not fit in L2 twice over."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(64, math.ceil(2 * l2 / max(nbytes, 1))))


def rel_error(y: Tensor, ref: Tensor) -> float:
    """||y - ref|| / ||ref|| in fp32."""
    y, ref = y.float(), ref.float()
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


def mismatch(y: Tensor, ref32: Tensor) -> str | None:
    """None if y (in its dtype) matches the fp32 reference up to its output rounding, else a description.

    Per element: one unit of rounding (eps relative; bf16 2^-7 also covers truncating casts, as
    triton's interpreter does) plus fp32 summation-order noise; overall: relative error under eps. A kernel
    that drops or repeats one group of a layer with 32+ groups is ~10x further off."""
    eps = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(y.dtype, 2**-18)
    if not bool(torch.isfinite(y).all()):
        return "non-finite values"
    err = (y.float() - ref32).abs()
    bound = eps * ref32.abs() + 1e-5 * float(ref32.abs().max())
    rel = rel_error(y, ref32)
    if bool((err > bound).any()) or rel > eps:
        return f"max abs error {float(err.max()):.3g}, relative error {rel:.2e} (tolerance {eps:.1e})"
    return None


def precompile(launches: Sequence[Callable[[], object]], device: torch.device, workers: int = 8) -> None:
    """Run one launch per config at once, so each compiles: Triton's compiler (MLIR passes, ptxas) runs
    outside the GIL, so threads cut a cold tune from ~configs x 1-2 s to a few seconds. Errors are ignored
    here: the tuner meets them again, one config at a time, and records them."""
    from concurrent.futures import ThreadPoolExecutor

    def build(launch_one: Callable[[], object]) -> None:
        try:
            with torch.cuda.device(device):  # the current device is per thread
                launch_one()
        except Exception:  # reported by the tuner
            pass

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(launches), os.cpu_count() or 1))) as pool:
        list(pool.map(build, launches))
    torch.cuda.synchronize(device)
    counters(device).zero_()  # launches that interleave (the interpreter's do) may leave a split counter set


class TuneResult(NamedTuple):
    best: Config
    seconds: dict[str, float]  # config name -> median seconds per call
    dropped: dict[str, str]  # config name -> why it was dropped (error, mismatch)


TUNED: dict[tuple, TuneResult] = {}  # (N, K, group, M, dtype, scales dtype) -> result, filled by best_config


@torch.no_grad()
def tune(
    p: Packed,
    m: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    configs: Sequence[Config] = CONFIGS,
    calls: int = 200,
    repeats: int = 5,
    bias: Tensor | None = None,
    seed: int = 0,
) -> TuneResult:
    """Time every config on this CUDA layer (after checking it against the reference; a config that raises
    or mismatches is dropped) and return the fastest. Weight copies rotate past L2."""
    dev = p.qweight.device
    if dev.type != "cuda":
        raise ValueError("tune() needs the packed weight on a CUDA device")
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(m, p.in_features, device=dev, generator=gen).to(dtype)
    ref = reference(x.float(), p, bias)  # fp32: the kernel's output is checked up to its own rounding
    counters(dev)
    n_copies = copies_for_l2(p.nbytes(), dev)
    ps = [p] + [Packed(p.qweight.clone(), p.scales.clone(), p.zeros.clone(), p.group_size) for _ in range(n_copies - 1)]
    precompile([functools.partial(launch, x, p, None, cfg) for cfg in configs], dev)
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for cfg in configs:
        try:
            y = gemv(x, p, bias, cfg)
            bad = mismatch(y, ref)
            if bad:
                dropped[cfg.name] = f"mismatch: {bad}"
                continue
            seconds[cfg.name] = time_graph(lambda i, c=cfg: gemv(x, ps[i % n_copies], bias, c), calls, repeats)
            y = gemv(x, p, bias, cfg)  # again after 200+ graph calls: split-K counters must be back at zero
            bad = mismatch(y, ref)
            if bad:
                dropped[cfg.name] = f"mismatch after repeated calls: {bad}"
                del seconds[cfg.name]
        except Exception as e:  # compile errors, out of resources: drop the config
            torch.cuda.synchronize(dev)
            dropped[cfg.name] = error_line(e, 200)
    if not seconds:
        raise RuntimeError(f"no Triton int4 config works for N={p.out_features} K={p.in_features}: {dropped}")
    by_name = {c.name: c for c in configs}
    best = min(seconds, key=seconds.__getitem__)
    return TuneResult(by_name[best], seconds, dropped)


def tuned(p: Packed, dtype: torch.dtype = torch.bfloat16) -> TuneResult:
    """tune() at M=1, once per (N, K, group, dtype, scales dtype): cached in TUNED."""
    key = (p.out_features, p.in_features, p.group_size, 1, dtype, p.scales.dtype)
    if key not in TUNED:
        TUNED[key] = remember_tune(
            "int4_triton", key, CONFIGS, __file__, p.qweight.device, lambda: tune(p, 1, dtype), TuneResult, Config
        )
    return TUNED[key]


def best_config(p: Packed, dtype: torch.dtype = torch.bfloat16) -> Config:
    """The tuned config for this layer's shape (see tuned()); DEFAULT_CONFIG off CUDA (reference path)."""
    if p.qweight.device.type != "cuda":
        return DEFAULT_CONFIG
    return tuned(p, dtype).best
