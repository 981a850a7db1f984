"""Length-aware decode attention: one query per head over the static KV cache, in Triton (split-KV,
"flash decoding").

Why: the FastEngine's step attends with SDPA over every slot of the static cache and masks the unused
ones, so each step reads the whole cache: 1.09 GB at max_seq_len 2079, 4.3 GB at 8223, whatever the
position. Over the seed's 8192 run the mean context is ~4200 tokens, so half of that read is waste, ~30%
of the BF16 weight bytes per step. Bucketing the length (FastEngine kv_block) trims it at the price of one
graph per bucket. This kernel reads the position from device memory instead, so one captured graph serves
every length and reads only slots [0, pos].

Work split: programs (split, head, row). The valid slots n = pos + 1 are cut into ceil(n/BLOCK) blocks and
those into SPLITS even runs, recomputed from n on every call, so all programs stay busy at any length.
Each program does an online softmax over its run in fp32 (scores, max, sum and the weighted V sum), one per
row of its [BLOCK, D] tile so that the loop has no reduction across warps (only the D-sum of each score,
within a warp), merges its rows after the loop and writes (acc[D], m, l) to a partial buffer. The last
program of a (row, head) to arrive, counted with an acq_rel atomic on the int4 kernels' shared zeroed
counters, merges the SPLITS partials in a fixed order (deterministic), writes the output row and resets its
counter: one kernel per layer, no combine launch.

Math: out = sum_j softmax_j(q.k_j / sqrt(D)) v_j over j <= pos, fp32 throughout, rounded once to q's
dtype. SDPA computes the same with bf16 probabilities in its P@V product, so the two differ by bf16
rounding (tests compare both against an fp32 reference).

Triton is optional and imported on first launch; off CUDA the custom op runs `reference` (or the kernel
itself on CPU tensors under TRITON_INTERPRET=1, which is how the tests run it without a GPU).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .int4_triton import counters, import_triton, mismatch, precompile, time_graph, triton_error


class Config(NamedTuple):
    """block: cache slots per loop step; splits: programs per (row, head), a power of two."""

    block: int
    splits: int
    num_warps: int
    num_stages: int = 2

    @property
    def name(self) -> str:
        return f"b{self.block}s{self.splits}w{self.num_warps}st{self.num_stages}"


# Sized for D = 128: a [block, D] tile is 8-32 elements a thread (K, V, next K, V and the per-row accumulator),
# splits <= 32 keep the merge's [splits, D] fp32 tile small; 1024 programs at most for 32 heads. 48-96
# registers, no spills, 16-byte loads on sm_80 and sm_90 (tested).
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
)
DEFAULT_CONFIG = Config(8, 32, 4)


def check(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> None:
    """Shapes the kernel serves: q [B, H, D], k and v [B, H, L, D] with unit stride along D, pos [1]."""
    if q.dim() != 3 or k.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} must be [B, H, D] and k, v {tuple(k.shape)} [B, H, L, D]")
    d = q.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16")
    if q.stride(2) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("q, k and v need unit stride along the head dim")
    if pos.numel() != 1 or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError("pos must be one integer position")


def reference(q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
    """out [B, H, D] = softmax(q k^T / sqrt(D)) v over slots 0..pos, fp32 math, in q's dtype."""
    n = int(pos.reshape(-1)[0]) + 1  # a host sync: the reference runs off CUDA only
    kf, vf = k[:, :, :n].float(), v[:, :, :n].float()
    scores = torch.einsum("bhd,bhnd->bhn", q.float(), kf) * q.shape[-1] ** -0.5
    return torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), vf).to(q.dtype)


@functools.cache
def _kernel() -> Any:
    """Compile-on-demand definition of the Triton kernel (imports triton)."""
    triton, tl = import_triton()

    @triton.jit
    def decode_attention_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, part_ptr, cnt_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, scale,
        D: tl.constexpr, BLOCK: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        split = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        n_heads = tl.num_programs(1)
        n = tl.load(pos_ptr).to(tl.int32) + 1  # valid slots [0, n)
        per = tl.cdiv(tl.cdiv(n, BLOCK), SPLITS) * BLOCK  # slots per split, whole blocks
        lo = split * per
        hi = tl.minimum(lo + per, n)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * scale
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        # One online softmax per row of the tile (slots r, r + BLOCK, ...): the loop needs no reduction across
        # rows, hence none across warps; the rows are merged once after it. The max starts at a finite floor
        # (-1e30, below any real score) so a row that has seen only masked slots keeps alpha = exp(0) = 1 and
        # p = exp(-inf) = 0, never exp(-inf + inf).
        m_r = tl.full((BLOCK,), -1e30, tl.float32)  # running max per row
        l_r = tl.zeros((BLOCK,), tl.float32)  # running sum of exp per row
        acc_r = tl.zeros((BLOCK, D), tl.float32)  # running sum of p * v per row
        # Triton does not pipeline loads that feed no tl.dot: the next block's K and V are loaded by hand
        # before this block's math, so two blocks a program are in flight instead of one.
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
        if arrived == SPLITS - 1:
            sp = tl.arange(0, SPLITS)
            parts = part_ptr + (row * SPLITS + sp) * (D + 2)
            m_s = tl.load(parts + D, cache_modifier=".cg")
            l_s = tl.load(parts + D + 1, cache_modifier=".cg")
            a_s = tl.load(parts[:, None] + d[None, :], cache_modifier=".cg")
            w = tl.exp(m_s - tl.max(m_s, axis=0))  # split 0 holds slot 0: the max is a real score, empties get 0
            out = tl.sum(w[:, None] * a_s, axis=0) / tl.sum(w * l_s, axis=0)
            tl.store(o_ptr + b * stride_ob + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))
            tl.atomic_xchg(cnt_ptr + row, 0)  # back to zero for the next call

    return decode_attention_kernel


def launch(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cfg: Config = DEFAULT_CONFIG) -> Tensor:
    """Run the kernel: q [B, H, D] over k, v [B, H, L, D] slots 0..pos -> out [B, H, D] in q's dtype.
    Needs triton (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton was imported)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    check(q, k, v, pos)
    if cfg.splits & (cfg.splits - 1) or cfg.block & (cfg.block - 1):
        raise ValueError(f"config {cfg.name}: block and splits must be powers of two")
    b, h, d = q.shape
    cnt = counters(q.device)
    if b * h > cnt.numel():
        raise ValueError(f"{b * h} (row, head) pairs exceed the {cnt.numel()} split counters")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    part = torch.empty(b * h * cfg.splits * (d + 2), dtype=torch.float32, device=q.device)
    _kernel()[(cfg.splits, h, b)](
        q, k, v, pos, out, part, cnt,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), d**-0.5,
        D=d, BLOCK=cfg.block, SPLITS=cfg.splits, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# torch.compile(fullgraph=True) traces the decode step: the launch must be opaque to dynamo.
@torch.library.custom_op("qvlq::decode_attention", mutates_args=())
def _decode_attention_op(
    q: Tensor, k: Tensor, v: Tensor, pos: Tensor, block: int, splits: int, num_warps: int, num_stages: int
) -> Tensor:
    if q.device.type == "cuda" or _interpreting():
        return launch(q, k, v, pos, Config(block, splits, num_warps, num_stages))
    return reference(q, k, v, pos)


@_decode_attention_op.register_fake
def _(q, k, v, pos, block, splits, num_warps, num_stages):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, cfg: Config = DEFAULT_CONFIG) -> Tensor:
    """out [B, H, D] = attention of q [B, H, D] over cache slots 0..pos of k, v [B, H, L, D]: the custom op
    (the Triton kernel on CUDA, the reference on the CPU)."""
    return torch.ops.qvlq.decode_attention(q, k, v, pos, cfg.block, cfg.splits, cfg.num_warps, cfg.num_stages)


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
    configs: Sequence[Config] = CONFIGS,
    layers: int = 8,
) -> TuneResult:
    """Time every config on CUDA at the middle of the cache (the mean position of a run that fills it from
    the start), checked against the fp32 reference at three positions first, and SDPA as the "sdpa" step
    runs it (all slots, additive mask). `layers` caches rotate so the KV read comes from HBM, as in the step."""
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, head_dim, device=device, generator=gen).to(dtype)
    caches = [
        (torch.randn(batch, heads, max_len, head_dim, device=device, generator=gen).to(dtype),
         torch.randn(batch, heads, max_len, head_dim, device=device, generator=gen).to(dtype))
        for _ in range(layers)
    ]  # fmt: skip
    mid = torch.tensor([max_len // 2], device=device)
    checks = [torch.tensor([p], device=device) for p in sorted({0, max_len // 2, max_len - 1})]
    counters(device)
    precompile([functools.partial(launch, q, *caches[0], mid, cfg) for cfg in configs], device)
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for cfg in configs:
        try:
            bad = None
            for p in checks:
                k, v = caches[0]
                ref = _reference_cuda(q, k, v, int(p))
                bad = bad or mismatch(launch(q, k, v, p, cfg), ref)
            if bad:
                dropped[cfg.name] = f"mismatch: {bad}"
                continue
            seconds[cfg.name] = time_graph(lambda i, c=cfg: launch(q, *caches[i % layers], mid, c), 64, 5)
        except Exception as e:  # compile errors, out of resources: drop the config
            torch.cuda.synchronize(device)
            dropped[cfg.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if not seconds:
        raise RuntimeError(f"no decode attention config works for B={batch} H={heads} D={head_dim}: {dropped}")
    bias = torch.zeros(1, 1, 1, max_len, dtype=dtype, device=device)
    bias[..., max_len // 2 + 1 :] = float("-inf")
    q4 = q.unsqueeze(2)
    sdpa_s = time_graph(lambda i: F.scaled_dot_product_attention(q4, *caches[i % layers], attn_mask=bias), 64, 5)
    by_name = {c.name: c for c in configs}
    return TuneResult(by_name[min(seconds, key=seconds.__getitem__)], seconds, dropped, max_len // 2, sdpa_s)


def _reference_cuda(q: Tensor, k: Tensor, v: Tensor, pos: int) -> Tensor:
    """fp32 reference for a known position (no device tensor to read)."""
    return reference(q.float(), k, v, torch.tensor([pos])).float()


def tuned(batch: int, heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device) -> TuneResult:
    """tune() once per cache geometry and device (cached in TUNED)."""
    key = (batch, heads, head_dim, max_len, dtype, str(device))
    if key not in TUNED:
        TUNED[key] = tune(batch, heads, head_dim, max_len, dtype, device)
    return TUNED[key]
