"""A decode step's attention for one layer in one Triton kernel: RoPE of this token's q and k, the logN
query scale, the KV-cache write and a length-aware split-KV ("flash decoding") attention.

Why, 1: the FastEngine's SDPA step attends over every slot of the static cache and masks the unused ones,
so each step reads the whole cache: 1.09 GB at max_seq_len 2079, 4.3 GB at 8223, whatever the position.
Over the seed's 8192 run the mean context is ~4200 tokens, so half of that read is waste, ~30% of the BF16
weight bytes per step. Bucketing the length (FastEngine kv_block) trims it at the price of one graph per
bucket. This kernel reads the position from device memory instead, so one captured graph serves every
length and reads only the slots it needs.
Why, 2: a decode step is ~450 small kernels; each costs its launch and tail. On the H200 the SDPA path
spent three kernels a layer on attention (cuDNN flash, a reduction, the mask) and three inductor kernels
on RoPE and the cache write (reports/int4/h200-decode-kernels-int4.json); here it is one.

Work split: programs (split, head, row). The cache slots [0, pos) are cut into ceil(pos/BLOCK) blocks and
those into SPLITS even runs, recomputed from pos on every call, so all programs stay busy at any length.
Each program rotates q (and k) itself, does an online softmax over its run in fp32 (scores, max, sum and
the weighted V sum), one per row of its [BLOCK, D] tile so that the loop has no reduction across warps
(only the D-sum of each score, within a warp), merges its rows after the loop and writes (acc[D], m, l)
to a partial buffer. Split 0 writes this token's rotated k and its v to slot pos (no program of the call
reads that slot). The last program of a (row, head) to arrive, counted with an acq_rel atomic on the int4
kernels' shared zeroed counters, merges the SPLITS partials and this token (from registers) in a fixed
order (deterministic), writes the output row and resets its counter: no combine launch.

Math, as the model's eager path (`reference`, which tests hold the kernel to): RoPE in fp32 rounded to the
activation dtype (no FMA: enable_fp_fusion=False, so the cached k is torch's bit for bit), q times logN in
that dtype, then out = sum_j softmax_j(q.k_j / sqrt(D)) v_j over j <= pos in fp32, rounded once. SDPA
computes the attention with bf16 probabilities in its P@V product, so the two differ by bf16 rounding.

PDL (PDL_CONFIGS, sm_90+, timed beside the plain configs by the tuner): the launch may begin while c_attn
ends. Each program lets the next launch (c_proj, whose PDL blocks then load weights) start, loads pos, its
RoPE rows and its first K/V tile, and only then waits for c_attn's output (griddepcontrol).

Triton is optional and imported on first launch; off CUDA the custom op runs `reference` (or the kernel
itself on CPU tensors under TRITON_INTERPRET=1, which is how the tests run it without a GPU).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .int4_mma import pdl_enabled
from .int4_triton import (
    counters,
    error_line,
    import_triton,
    interpreting,
    mismatch,
    precompile,
    time_graph,
    triton_error,
)
from .model.modeling import apply_rope, rope_cos_sin
from .tuning import remember_tune


class Config(NamedTuple):
    """block: cache slots per loop step; splits: programs per (row, head), a power of two; pdl: launched as a
    programmatic dependent launch (sm_90+, see PDL in the kernel)."""

    block: int
    splits: int
    num_warps: int
    num_stages: int = 2
    pdl: int = 0

    @property
    def name(self) -> str:
        return f"b{self.block}s{self.splits}w{self.num_warps}st{self.num_stages}{'-pdl' if self.pdl else ''}"

    @property
    def merge(self) -> int:
        """Partials the last program merges at a time (the kernel's MERGE)."""
        return min(self.splits, MERGE_SPLITS)


# Sized for D = 128: a [block, D] tile is 8-32 elements a thread (K, V, next K, V and the per-row accumulator);
# the merge reads MERGE_SPLITS partials at a time, a [32, D] fp32 tile. 64 splits (2048 programs for 32 heads):
# fewer loop steps a program, so less of a DRAM round trip per step left exposed, for a longer merge; on the
# H200 32 splits beat 16 by 22% at position 4111 (reports/int4/). 50-120 registers, no spills, 16-byte loads
# on sm_80 and sm_90 (tested).
CONFIGS: tuple[Config, ...] = (
    Config(8, 16, 2),
    Config(8, 32, 2),
    Config(8, 16, 4),
    Config(8, 32, 4),
    Config(16, 16, 4),
    Config(16, 32, 4, 3),
    Config(16, 16, 8),
    Config(32, 16, 8),
    Config(32, 32, 8, 3),
    Config(8, 64, 2),
    Config(8, 64, 4),
    Config(16, 64, 4),
)
MERGE_SPLITS = 32
DEFAULT_CONFIG = Config(8, 32, 4)
# The same launched with PDL (Hopper+): each program starts while the kernel before it (c_attn) ends, and
# the kernel after it (c_proj, a PDL mma launch) may start while this one's last programs merge.
PDL_CONFIGS = tuple(c._replace(pdl=1) for c in CONFIGS)


def configs_for(device: torch.device) -> tuple[Config, ...]:
    """The configs tune() tries on this device: CONFIGS, and PDL_CONFIGS where int4_mma.pdl_enabled."""
    return CONFIGS + (PDL_CONFIGS if pdl_enabled(device) else ())


def check(qkv: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, logn: Tensor | None) -> None:
    """What the kernel serves: qkv [B, 3, H, D] (this token's q, k, v before RoPE), caches k, v [B, H, L, D],
    fp32 RoPE tables cos, sin [L, D], pos [1], logn None or one value; unit stride along D everywhere."""
    if qkv.dim() != 4 or qkv.shape[1] != 3 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"qkv {tuple(qkv.shape)} must be [B, 3, H, D] and k, v {tuple(k.shape)} [B, H, L, D]")
    b, _, h, d = qkv.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(f"qkv {tuple(qkv.shape)} does not match the cache {tuple(k.shape)}")
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    if cos.shape != sin.shape or cos.shape != (k.shape[2], d) or cos.dtype != torch.float32:
        raise ValueError(f"cos, sin {tuple(cos.shape)} must be fp32 [{k.shape[2]}, {d}] (one row per cache slot)")
    if any(t.stride(-1) != 1 for t in (qkv, k, v, cos, sin)) or cos.stride(0) != sin.stride(0):
        raise ValueError("qkv, k, v, cos and sin need unit stride along the head dim (cos, sin alike)")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError("pos must be one integer position")
    if logn is not None and logn.numel() != 1:
        raise ValueError("logn must be one value (the query scale of this position)")


def reference(
    qkv: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, logn: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor:  # fmt: skip
    """The FastEngine's SDPA step for one layer, in torch: RoPE on q and k (the model's apply_rope), q times
    logn (cast to q's dtype first), k and v written to cache slot pos, then softmax(q k^T / sqrt(D)) v over
    slots 0..pos in fp32 -> out [B, H, D] in q's dtype (or out_dtype). Writes the caches, as the kernel does."""
    p = int(pos.reshape(-1)[0])  # a host sync: the reference runs off CUDA only
    q, kn, vn = qkv.unbind(1)
    q, kn = apply_rope(q, cos[p], sin[p]), apply_rope(kn, cos[p], sin[p])
    if logn is not None:
        q = q * logn.reshape(()).to(q.dtype)
    k[:, :, p] = kn
    v[:, :, p] = vn
    kf, vf = k[:, :, : p + 1].float(), v[:, :, : p + 1].float()
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), kf) * q.shape[-1] ** -0.5
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), vf).to(out_dtype or q.dtype)


@functools.cache
def _kernel() -> Any:
    """Compile-on-demand definition of the Triton kernel (imports triton)."""
    triton, tl = import_triton()
    # Triton (and its interpreter) resolve the helpers a kernel calls among the module's globals, not in
    # this closure: they are defined as module globals here, when triton is first needed.
    global _round_to, _rope, _merge, _grid_wait, _grid_release
    if interpreting():  # no inline PTX there, and programs run one after another: nothing to order

        @triton.jit
        def _grid_wait():
            pass

        @triton.jit
        def _grid_release():
            pass

    else:  # griddepcontrol.wait / .launch_dependents: no-ops in a launch without PDL
        from triton.language.extra.cuda import gdc_launch_dependents as _grid_release
        from triton.language.extra.cuda import gdc_wait as _grid_wait

    @triton.jit
    def _round_to(x, dtype: tl.constexpr):
        """fp32 -> dtype, round to nearest even. bf16 by bit arithmetic (what cvt.rn does on the GPU): the
        interpreter's cast truncates, and the cache must hold the RoPE'd k bit for bit as torch rounds it."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

    @triton.jit
    def _rope(x_ptr, c, sn, D: tl.constexpr, dtype: tl.constexpr):
        """The D values at x_ptr rotated as apply_rope does (rotate half, fp32, rounded to dtype):
        out[d] = x[d] cos[d] + sign[d] x[partner[d]] sin[d]."""
        d = tl.arange(0, D)
        partner = tl.where(d < D // 2, d + D // 2, d - D // 2)
        sign = tl.where(d < D // 2, -1.0, 1.0)
        x = tl.load(x_ptr + d).to(tl.float32)
        return _round_to(x * c + sign * tl.load(x_ptr + partner).to(tl.float32) * sn, dtype)

    @triton.jit
    def _merge(parts, first, m, num, den, D: tl.constexpr, MERGE: tl.constexpr):
        """(max, sum of weighted acc, sum of weighted l) after folding in the partials first.. first + MERGE
        (each D accumulators, then max and sum) of one (row, head): online softmax rescaling."""
        p = parts + (first + tl.arange(0, MERGE)) * (D + 2)
        m_s = tl.load(p + D, cache_modifier=".cg")
        l_s = tl.load(p + D + 1, cache_modifier=".cg")
        a_s = tl.load(p[:, None] + tl.arange(0, D)[None, :], cache_modifier=".cg")
        m_new = tl.maximum(tl.max(m_s, axis=0), m)
        old = tl.exp(m - m_new)
        w = tl.exp(m_s - m_new)
        return m_new, num * old + tl.sum(w[:, None] * a_s, axis=0), den * old + tl.sum(w * l_s, axis=0)

    @triton.jit
    def decode_attention_kernel(
        x_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, logn_ptr, o_ptr, part_ptr, cnt_ptr,
        stride_xb, stride_xp, stride_xh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_cs, scale,
        D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr, HAS_LOGN: tl.constexpr, MERGE: tl.constexpr,
        PDL: tl.constexpr,
    ):  # fmt: skip
        split = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        n_heads = tl.num_programs(1)
        dtype = x_ptr.dtype.element_ty
        if PDL:  # the next launch (c_proj) may start once every program has: it preloads weights, then waits
            _grid_release()
        pos = tl.load(pos_ptr).to(tl.int32)
        n = pos  # the cache holds slots [0, pos); this token's k, v come from registers (see the merge)
        per = tl.cdiv(tl.cdiv(n, BLOCK), SPLITS) * BLOCK  # slots per split, whole blocks
        lo = split * per
        hi = tl.minimum(lo + per, n)
        d = tl.arange(0, D)
        # every program rotates this token's q and k itself (2 x D values)
        c = tl.load(cos_ptr + pos * stride_cs + d)
        sn = tl.load(sin_ptr + pos * stride_cs + d)
        if PDL:
            # This program may run while the kernel before it (c_attn, which writes x) still does. Before the
            # wait it reads only pos, the RoPE tables and cache slots [0, pos). In a decode step all of them were
            # written before some launch without PDL that precedes this one (the position fill, the embedding,
            # the previous step's lm_head), and no PDL launch starts before such a launch has ended. So its first
            # K and V tile loads under the previous kernel's tail; x, logn and every write wait.
            idx = lo + tl.arange(0, BLOCK)
            tile = idx[:, None] * stride_ks + d[None, :]
            k_next = tl.load(k_ptr + b * stride_kb + h * stride_kh + tile, mask=(idx < hi)[:, None], other=0.0)
            tile = idx[:, None] * stride_vs + d[None, :]
            v_next = tl.load(v_ptr + b * stride_vb + h * stride_vh + tile, mask=(idx < hi)[:, None], other=0.0)
            _grid_wait()
        x_base = x_ptr + b * stride_xb + h * stride_xh
        q = _rope(x_base, c, sn, D, dtype)
        if HAS_LOGN:  # the reference multiplies in the activation dtype: one more rounding
            q = _round_to(q.to(tl.float32) * tl.load(logn_ptr).to(tl.float32), dtype)
        q = q.to(tl.float32) * scale
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        k_new = _rope(x_base + stride_xp, c, sn, D, dtype)
        v_new = tl.load(x_base + 2 * stride_xp + d)
        if split == 0:  # the cache write of this token; no program reads slot pos in this call
            tl.store(k_base + pos * stride_ks + d, k_new)
            tl.store(v_base + pos * stride_vs + d, v_new)
        # One online softmax per row of the tile (slots r, r + BLOCK, ...): the loop needs no reduction across
        # rows, hence none across warps; the rows are merged once after it. The max starts at a finite floor
        # (-1e30, below any real score) so a row that has seen only masked slots keeps alpha = exp(0) = 1 and
        # p = exp(-inf) = 0, never exp(-inf + inf).
        m_r = tl.full((BLOCK,), -1e30, tl.float32)  # running max per row
        l_r = tl.zeros((BLOCK,), tl.float32)  # running sum of exp per row
        acc_r = tl.zeros((BLOCK, D), tl.float32)  # running sum of p * v per row
        # Triton does not pipeline loads that feed no tl.dot: the next block's K and V are loaded by hand
        # before this block's math, so two blocks a program are in flight instead of one.
        if not PDL:  # (with PDL: loaded before the wait)
            idx = lo + tl.arange(0, BLOCK)
            k_next = tl.load(k_base + idx[:, None] * stride_ks + d[None, :], mask=(idx < hi)[:, None], other=0.0)
            v_next = tl.load(v_base + idx[:, None] * stride_vs + d[None, :], mask=(idx < hi)[:, None], other=0.0)
        for start in range(lo, hi, BLOCK):
            ok = start + tl.arange(0, BLOCK) < hi
            kt, vt = k_next, v_next
            idx = start + BLOCK + tl.arange(0, BLOCK)
            k_next = tl.load(k_base + idx[:, None] * stride_ks + d[None, :], mask=(idx < hi)[:, None], other=0.0)
            v_next = tl.load(v_base + idx[:, None] * stride_vs + d[None, :], mask=(idx < hi)[:, None], other=0.0)
            s = tl.where(ok, tl.sum(kt.to(tl.float32) * q[None, :], axis=1), float("-inf"))
            m_new = tl.maximum(m_r, s)
            alpha = tl.exp(m_r - m_new)
            p = tl.exp(s - m_new)
            acc_r = acc_r * alpha[:, None] + p[:, None] * vt.to(tl.float32)
            l_r = l_r * alpha + p
            m_r = m_new
        m_i = tl.max(m_r, axis=0)  # this split's max: the floor if it holds no slot (then l = 0, acc = 0)
        w_r = tl.exp(m_r - m_i)
        l_i = tl.sum(l_r * w_r, axis=0)
        acc = tl.sum(acc_r * w_r[:, None], axis=0)
        row = b * n_heads + h
        part = part_ptr + (row * SPLITS + split) * (D + 2)
        tl.store(part + d, acc)
        tl.store(part + D, m_i)
        tl.store(part + D + 1, l_i)
        tl.debug_barrier()  # all threads' partial stores precede the release below
        arrived = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:  # the last program merges the splits and this token (slot pos)
            # from this token (weight 1 at its own score), MERGE partials at a time (a [MERGE, D] tile: registers
            # stay bounded with many splits); one chunk when SPLITS <= MERGE. A real score starts the max, so
            # empty splits (the floor) get weight 0.
            m = tl.sum(q * k_new.to(tl.float32), axis=0)
            num = v_new.to(tl.float32)
            den = m * 0.0 + 1.0
            parts = part_ptr + row * SPLITS * (D + 2)
            if SPLITS == MERGE:
                m, num, den = _merge(parts, 0, m, num, den, D, MERGE)
            else:  # a loop, not unrolled: one chunk's [MERGE, D] tile in registers at a time
                for first in range(0, SPLITS, MERGE):
                    m, num, den = _merge(parts, first, m, num, den, D, MERGE)
            out = num / den
            tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))
            tl.atomic_xchg(cnt_ptr + row, 0)  # back to zero for the next call

    return decode_attention_kernel


def launch(
    qkv: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, logn: Tensor | None = None,
    cfg: Config = DEFAULT_CONFIG,
) -> Tensor:  # fmt: skip
    """Run the kernel (see `reference` for what it computes; it writes cache slot pos): out [B, H, D] in qkv's
    dtype. Needs triton (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton was imported)."""
    check(qkv, k, v, cos, sin, pos, logn)
    if cfg.splits & (cfg.splits - 1) or cfg.block & (cfg.block - 1):
        raise ValueError(f"config {cfg.name}: block and splits must be powers of two")
    b, _, h, d = qkv.shape
    cnt = counters(qkv.device)
    if b * h > cnt.numel():
        raise ValueError(f"{b * h} (row, head) pairs exceed the {cnt.numel()} split counters")
    out = torch.empty(b, h, d, dtype=qkv.dtype, device=qkv.device)
    part = torch.empty(b * h * cfg.splits * (d + 2), dtype=torch.float32, device=qkv.device)
    _kernel()[(cfg.splits, h, b)](
        qkv, k, v, cos, sin, pos, out if logn is None else logn, out, part, cnt,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), cos.stride(0), d**-0.5,
        D=d, BLOCK=cfg.block, SPLITS=cfg.splits, HAS_LOGN=logn is not None, MERGE=cfg.merge, PDL=cfg.pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=bool(cfg.pdl),
        enable_fp_fusion=False,  # RoPE's x cos + r sin rounded as torch rounds it (no FMA): the same cached k
    )  # fmt: skip
    return out


# torch.compile(fullgraph=True) traces the decode step: the launch must be opaque to dynamo. The op writes
# the caches in place (declared, so functionalization and inductor's reinplacing see it).
@torch.library.custom_op("qvlq::decode_attention", mutates_args=("k", "v"))
def _decode_attention_op(
    qkv: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, logn: Tensor | None,
    block: int, splits: int, num_warps: int, num_stages: int, pdl: int,
) -> Tensor:  # fmt: skip
    if qkv.device.type == "cuda" or interpreting():
        return launch(qkv, k, v, cos, sin, pos, logn, Config(block, splits, num_warps, num_stages, pdl))
    return reference(qkv, k, v, cos, sin, pos, logn)


@_decode_attention_op.register_fake
def _(qkv, k, v, cos, sin, pos, logn, block, splits, num_warps, num_stages, pdl):
    return qkv.new_empty(qkv.shape[0], qkv.shape[2], qkv.shape[3])


def decode_attention(
    qkv: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, logn: Tensor | None = None,
    cfg: Config = DEFAULT_CONFIG,
) -> Tensor:  # fmt: skip
    """One decode step's attention for one layer, fused: RoPE of this token's q and k (qkv [B, 3, H, D], the
    c_attn output), q times logn, k and v written to cache slot pos, attention over slots 0..pos -> out
    [B, H, D]. The custom op: the Triton kernel on CUDA, `reference` on the CPU."""
    return torch.ops.qvlq.decode_attention(
        qkv, k, v, cos, sin, pos, logn, cfg.block, cfg.splits, cfg.num_warps, cfg.num_stages, cfg.pdl
    )


def unavailable(device: torch.device) -> str | None:
    """None if the kernel can run on this device, else why not (the CPU always runs the reference)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"decode attention runs on CUDA or CPU, not {device.type}"
    return triton_error()


# ------------------------------------------------------------------------------------------ tuning
class TuneResult(NamedTuple):
    best: Config
    seconds: dict[str, float]  # config name -> median seconds per call at the tuning length
    dropped: dict[str, str]  # config name -> why it was dropped (error, mismatch)
    length: int  # the position the configs were timed at
    sdpa_s: float  # SDPA as the FastEngine's "sdpa" step runs it: over all slots with a 0/-inf mask


TUNED: dict[tuple, TuneResult] = {}  # (B, H, D, L, dtype, device) -> result, filled by tuned()


@torch.no_grad()
def tune(
    batch: int,
    heads: int,
    head_dim: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device,
    configs: Sequence[Config] | None = None,
    layers: int = 8,
) -> TuneResult:
    """Time every config on CUDA at the middle of the cache (the mean position of a run that fills it from
    the start), after checking it against the reference at three positions (output and cache writes up to
    their rounding); and SDPA as the "sdpa" step runs it (all slots, additive mask; alone, while the kernel's
    time includes RoPE and the cache write: the comparison leans to SDPA). `layers` caches rotate so the KV
    read comes from HBM, as in the step."""
    configs = configs_for(device) if configs is None else configs
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(batch, 3, heads, head_dim, device=device, generator=gen).to(dtype)
    caches = [
        (torch.randn(batch, heads, max_len, head_dim, device=device, generator=gen).to(dtype),
         torch.randn(batch, heads, max_len, head_dim, device=device, generator=gen).to(dtype))
        for _ in range(layers)
    ]  # fmt: skip
    cos, sin = rope_cos_sin(torch.arange(max_len, device=device), head_dim, 10000.0, 1.0)
    logn = torch.tensor([1.25], dtype=dtype, device=device)  # the model passes one from seq_length on
    mid = torch.tensor([max_len // 2], device=device)
    checks = [torch.tensor([p], device=device) for p in sorted({0, max_len // 2, max_len - 1})]
    counters(device)  # allocated here, outside any graph's memory pool (the engine captures after tuning)
    precompile([functools.partial(launch, qkv, *caches[0], cos, sin, mid, logn, cfg) for cfg in configs], device)
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for cfg in configs:
        try:
            bad = None
            for p in checks:
                k, v = (t.clone() for t in caches[0])
                k_ref, v_ref = (t.clone() for t in caches[0])
                y = launch(qkv, k, v, cos, sin, p, logn, cfg)
                bad = bad or mismatch(y, reference(qkv, k_ref, v_ref, cos, sin, p, logn, torch.float32))
                # the cache up to rounding here (the tests hold it to bit-exact): a 1-ulp RoPE difference on some
                # GPU should not keep the kernel from being measured
                if not bad and (mismatch(k, k_ref.float()) or mismatch(v, v_ref.float())):
                    bad = f"cache write at slot {int(p)} differs from the reference"
            if bad:
                dropped[cfg.name] = f"mismatch: {bad}"
                continue
            seconds[cfg.name] = time_graph(
                lambda i, c=cfg: launch(qkv, *caches[i % layers], cos, sin, mid, logn, c), 64, 5
            )
        except Exception as e:  # compile errors, out of resources: drop the config
            torch.cuda.synchronize(device)
            dropped[cfg.name] = error_line(e, 200)
    if not seconds:
        raise RuntimeError(f"no decode attention config works for B={batch} H={heads} D={head_dim}: {dropped}")
    bias = torch.zeros(1, 1, 1, max_len, dtype=dtype, device=device)
    bias[..., max_len // 2 + 1 :] = float("-inf")
    q4 = qkv[:, 0].unsqueeze(2)
    sdpa_s = time_graph(lambda i: F.scaled_dot_product_attention(q4, *caches[i % layers], attn_mask=bias), 64, 5)
    by_name = {c.name: c for c in configs}
    return TuneResult(by_name[min(seconds, key=seconds.__getitem__)], seconds, dropped, max_len // 2, sdpa_s)


def tuned(batch: int, heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device) -> TuneResult:
    """tune() once per cache geometry and device (cached in TUNED)."""
    key = (batch, heads, head_dim, max_len, dtype, str(device))
    if key not in TUNED:
        TUNED[key] = remember_tune(
            "decode_attention", key[:5], configs_for(device), __file__, device,
            lambda: tune(batch, heads, head_dim, max_len, dtype, device), TuneResult, Config,
        )  # fmt: skip
    # a result read from disk skipped tune(), which allocates the counters: without this, the first launch would
    # allocate them inside the engine's CUDA-graph pool, and inductor refuses a live allocation it did not make
    counters(device)
    return TUNED[key]
