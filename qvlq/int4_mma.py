"""A tensor-core int4 GEMV for batch-1 decoding, in CUDA C compiled at run time (NVRTC, through ctypes).

Why: at one row a linear layer is a pure weight stream (0.5 byte per weight). tinygemm reaches ~1/3 of
the copy bandwidth there and qvlq's Triton kernel less (reports/int4/): both spend several integer and
float instructions per weight. Here the dequantization costs ~1.4 instructions per weight and the
multiply-add none: the weight tile is operand A of `mma.m16n8k16` (16 outputs x 16 inputs), x is
operand B (its one column repeated in all 8), the tensor core accumulates in fp32 (sm_90 SASS of the main
loop: ~1.8 instructions per weight in all, no spills). Measured (reports/int4/): 1.35-1.66x tinygemm per
full-size shape on an H200, 1.22-1.38x on an H100 (73-77% of the copy bandwidth on the large shapes).

Per packed int32 word (8 codes) a lane builds its four A registers (two 16-bit values each) as
    a_p = ((w >> 4p) & 0x000F000F) | MAGIC        p = 0..3: low half = code p, high half = code p + 4
    a_p = a_p * 1 + (-(MAGIC_VALUE + z))          one fma.rn.{bf16,f16}x2: q - z, exact
where MAGIC puts the code in the low mantissa bits (bf16 0x4300 = 128: 128 + q; fp16 0x6400 = 1024).
Per group the two fp32 partial sums (rows g and g+8 of the tile) are scaled by s in fp32, so the
result is sum_g s_g * sum_k (q - z) x: the reference's math up to the order (and the tensor core's not
quite IEEE rounding) of the fp32 sums.

Fragment layout of mma.m16n8k16 (PTX ISA; g = lane / 4, t = lane % 4):
    A regs 0..3: (row g, k 2t..2t+1), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
    B regs 0..1: (k 2t..2t+1, col g), (k 2t+8..2t+9, col g)       C: c0 = (row g, col 2t), c2 = (row g+8, col 2t)
Mma k is a permutation of the real input index inside a 64-input chunk: tile j (0..3) maps k 2t+e to
16t + 4j + e and k 2t+8+e to 16t + 4j + 2 + e, so lane quad t needs x[16t : 16t+16] of the chunk for all
four tiles: two 16-byte loads, no shuffles. The layout (`pack`):
    qweight int32 [N/16, K/64, 32, 4]   tile T, chunk c, lane, word j (mma tile j): one 16-byte load per lane
    meta    int32 [N/16, G, 8, 2]       per tile, group, g: fp16 scales of rows g | g+8 << 16, then the
                                        16-bit -(magic value + z) of rows g | g+8 << 16: 4 bytes a row and
                                        group (6% of the weight's bytes at group 128, as tinygemm's bf16 pair)
A block owns `tiles` 16-row tiles; its `warps` warps split K in steps of 256 inputs (split-K inside the block,
reduced through shared memory: no atomics, no second kernel); grid.y runs the rows of x. A GEMV here lasts
2-15 us, about one DRAM round trip per warp step, so every load of a step is issued before its first mma
(see FENCE in SOURCE).

Variants of the same source take a decode step's small ops into the launch (Config.glu/norm/resid, used by
qvlq.int4.fuse_mma and fuse_block): the MLP gate w1 * silu(w2) of two stacked layers, the RMSNorm of the
input row (prologue) and the residual add (epilogue), each rounded as the model's eager ops round.

On sm_90+ the tuner also times each config launched as a programmatic dependent launch (PDL_CONFIGS,
cuLaunchKernelEx): a decode step is a chain of 2-15 us kernels, and with PDL each one's blocks start while
the kernel before it finishes, issue their first weight loads, and only then wait for its output.

Needs: CUDA compute capability 8.0+, libnvrtc (PyTorch's CUDA wheels depend on it) and the driver's
libcuda. Nothing is compiled until a kernel is launched; on the CPU the custom op runs `emulate`, a
lane-by-lane model of the kernel that the tests check against the dense reference. The tests also build
SOURCE itself for the host (tests/int4_mma_host.cpp: the PTX helpers in C++, one thread per CUDA thread)
and compile it with nvcc and NVRTC; `layout_probe` names any misplaced weight when it first meets a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import site
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from qvlq import int4_triton
from qvlq.cuda_driver import check as check_cu
from qvlq.cuda_driver import current_context, libcuda
from qvlq.io import atomic_write_bytes, user_cache_dir
from qvlq.model.modeling import rms_norm  # what the norm prologue computes
from qvlq.tuning import remember_tune

CHUNK = 64  # inputs per 16-byte lane load (4 mma tiles of 16)
# dtype -> (magic halves, magic value, mma type, 1.0 halves); magic | q reads as magic value + q
FORMATS = {
    torch.bfloat16: (0x43004300, 128.0, "bf16", 0x3F803F80),
    torch.float16: (0x64006400, 1024.0, "f16", 0x3C003C00),
}
STEP = 256  # inputs per loop step of a warp (4 chunks)
MAX_GRID_Y = 65535  # rows of x per launch


FLAG_NAMES = (("norm", "norm"), ("glu", "glu"), ("resid", "res"))  # Config's fused parts, as config names show them


def flags_name(flags: dict[str, int]) -> str:
    """Config's glu / norm / resid flags as config names show them: "norm-glu", "res"."""
    return "-".join(name for f, name in FLAG_NAMES if flags.get(f))


class Config(NamedTuple):
    """warps: warps per block, each taking a share of the K steps; tiles: 16-row tiles per block (a lane's x
    loads serve all of them); fence: all loads of a step issued before its first mma (see SOURCE); stages:
    0 = each step's operands loaded into registers, else a ring of that many steps per warp in shared memory
    filled by cp.async, stages - 1 steps in flight while one is computed (fence then has no use); glu: the
    weight is two layers of equal size stacked (a's rows, then b's) and the block has twice the warps: the
    first `warps` compute `tiles` tiles of a as a glu=0 block would, the others the same tiles of b, and the
    block writes a * silu(b) (Qwen's MLP gate), N/2 outputs. Each warp does a glu=0 warp's work, so a and b
    are bit for bit those of the layers' own calls, then rounded and combined as torch's eager ops do.
    norm (= K): x is the residual stream, normalized in the kernel by the model's RMSNorm (modeling.rms_norm) before
    the product; resid: y = resid + the product, rounded as torch's add (the residual add after c_proj);
    pdl: launched as a programmatic dependent launch (sm_90+, see PDL in SOURCE)."""

    warps: int
    tiles: int
    fence: int = 1
    stages: int = 0
    glu: int = 0
    norm: int = 0
    resid: int = 0
    pdl: int = 0

    @property
    def name(self) -> str:
        tail = f"s{self.stages}" if self.stages else "" if self.fence else "-nofence"
        flags = flags_name({f: getattr(self, f) for f, _ in FLAG_NAMES})
        return f"w{self.warps}t{self.tiles}{tail}{'-pdl' if self.pdl else ''}{'-' if flags else ''}{flags}"

    def shared_bytes(self, group_size: int) -> int:
        """Static shared memory of the ring and of the normalized x (a static allocation may take 48 KB)."""
        gps = 1 if group_size // CHUNK >= 4 else 4 // (group_size // CHUNK)
        ring = self.threads // 32 * self.stages * (self.tiles * (2048 + 64 * gps) + 512)
        return ring + (2 * self.norm + 4 * (self.threads + self.threads // 32) if self.norm else 0)

    @property
    def threads(self) -> int:
        return self.warps * (2 if self.glu else 1) * 32


SHARED_LIMIT = 48 * 1024
# the ring's configs fit SHARED_LIMIT at every group size (group 64 takes the most metadata)
CONFIGS = tuple(Config(w, t, f) for f in (1, 0) for w, t in ((4, 1), (8, 1), (16, 1), (4, 2), (8, 2))) + tuple(
    Config(w, t, 1, s) for w, t, s in ((4, 1, 2), (4, 1, 3), (4, 1, 4), (8, 1, 2), (2, 1, 4), (2, 1, 6), (4, 2, 2))
)
DEFAULT_CONFIG = Config(8, 1)
# The same blocks launched with PDL: each may start while the kernel before it ends (its weight loads overlap that
# kernel's tail and the launch gap). Hopper+ only; the tuner times them beside CONFIGS there.
PDL_CONFIGS = tuple(c._replace(pdl=1) for c in CONFIGS)
PDL_CAPABILITY = (9, 0)


ENV_PDL = "QVLQ_PDL"  # 0: no tuner tries PDL launches (mma and decode attention; an A/B of the decode step)


def pdl_enabled(device: torch.device) -> bool:
    """Whether the tuners try PDL launches here: CUDA sm_90+, unless $QVLQ_PDL is 0."""
    off = os.environ.get(ENV_PDL, "").strip() == "0"
    return not off and device.type == "cuda" and _capability(_index(device)) >= PDL_CAPABILITY


def configs_for(device: torch.device) -> tuple[Config, ...]:
    """The configs tune() tries on this device: CONFIGS, and PDL_CONFIGS where pdl_enabled."""
    return CONFIGS + (PDL_CONFIGS if pdl_enabled(device) else ())


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


MAX_THREADS = 512  # a 1024-thread block caps a thread at 64 registers: the main loop spills


def variant(cfg: Config, group_size: int, glu: int = 0, norm: int = 0, resid: int = 0) -> Config | None:
    """cfg with the glu block, the norm prologue and/or the residual epilogue, or None where that block does
    not fit: over MAX_THREADS, or over the static shared memory (a ring, the normalized x)."""
    v = cfg._replace(glu=glu, norm=norm, resid=resid)
    return v if v.threads <= MAX_THREADS and v.shared_bytes(group_size) <= SHARED_LIMIT else None


ENV_NVRTC = "QVLQ_NVRTC"  # path of libnvrtc.so, when it is not found on its own

SOURCE = r"""
// No headers: NVRTC compiles this as is. u4 is one 16-byte load. The PTX sits in the four functions
// below; tests build the kernel for the host with C++ versions of them (QVLQ_HOST, see host_harness).
struct alignas(16) u4 { unsigned int x, y, z, w; };
struct alignas(8) u2 { unsigned int x, y; };
struct alignas(16) f4 { float x, y, z, w; };
typedef unsigned long long u64;
#ifndef QVLQ_HOST
__device__ __forceinline__ float fp16_to_float(unsigned int h) {  // the low 16 bits
  float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h)); return f;
}
// (a & b) | c in one instruction: with two immediates the compiler emits two
__device__ __forceinline__ unsigned int and_or(unsigned int a, unsigned int b, unsigned int c) {
  unsigned int d; asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
// a * b + c on two 16-bit values
__device__ __forceinline__ unsigned int fma2(unsigned int a, unsigned int b, unsigned int c) {
  unsigned int d; asm(FMA2 " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); return d;
}
// cp.async (sm_80+): global -> shared without registers, in commit groups; wait_group N leaves the N newest
__device__ __forceinline__ unsigned int smem_addr(const void* p) {
  unsigned int a; asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p)); return a;
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" :: "r"(smem_addr(dst)), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
}
__device__ __forceinline__ void sync_warp() { asm volatile("bar.warp.sync -1;" ::: "memory"); }
__device__ __forceinline__ float act_to_float(unsigned int h) {  // the low 16 bits, in the activation dtype
#if ACT_BF16
  float f; asm("mov.b32 %0, %1;" : "=f"(f) : "r"((h & 0xFFFFu) << 16)); return f;
#else
  return fp16_to_float(h);
#endif
}
__device__ __forceinline__ unsigned short to_half(float v) {
  unsigned short h; asm(CVT " %0, %1;" : "=h"(h) : "f"(v)); return h;
}
__device__ __forceinline__ float rsqrt_(float v) { return rsqrtf(v); }
#endif
// PDL (sm_90+, launched with programmatic stream serialization): the block may start while the previous kernel
// in the stream still runs. It only reads weights until grid_wait() returns (the previous grid complete, its
// writes visible) and writes nothing before: x, gamma, resid and y are touched after it. grid_release() lets
// the next such launch start once every block of this one has begun.
// x and resid are written by the kernels just before this one: with PDL while this one already runs, so they
// are not read through the non-coherent path that __restrict__ const allows (weights, meta and gamma are).
#if PDL
#define ACT_RESTRICT
#else
#define ACT_RESTRICT __restrict__
#endif
#if PDL && !defined(QVLQ_HOST) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void grid_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void grid_release() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
#else
__device__ __forceinline__ void grid_wait() {}
__device__ __forceinline__ void grid_release() {}
#endif
#ifndef QVLQ_HOST
// d += A (16x16, 4 regs per lane) @ B (16x8, 2 regs per lane), fp32 (4 regs per lane)
__device__ __forceinline__ void mma(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
  asm volatile(MMA " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

// One block: TN 16-row tiles of W (from blockIdx.x * TN) for one row of x (blockIdx.y). A step is 4
// chunks (256 inputs); each of the WH warps takes a contiguous run of steps, shared memory sums them. With
// GLU the block has twice the warps (WARPS = 2 WH): the second WH do the same for the TN tiles `half` tiles
// further on (b's rows of the same outputs), and the epilogue combines the two.
// A warp has 1-3 steps at full size, so the loads of a step must all be in flight together. Left alone,
// ptxas places some of them after the first mma (a round trip each). FENCE: `zero` (always 0, unknown to
// the compiler) makes the first mma depend on every load of the step, so all are issued before it (more
// registers: 80 vs 56 a thread at group 128, so fewer resident warps; the tuner decides).
// NORM (= K): x is the residual stream and the block first applies the model's RMSNorm (weight gamma) to its
// row, into shared memory, where the main loop reads it. RESID: y = resid + (the product rounded), the residual
// add after attn.c_proj and mlp.c_proj. Both as the model's eager ops round (see rms_norm).
#if NORM
// two 16-bit values of x -> (x * r rounded) * gamma rounded, each half
__device__ __forceinline__ unsigned int norm2(unsigned int v, unsigned int g, float r) {
  const unsigned int lo = to_half(act_to_float(to_half(act_to_float(v) * r)) * act_to_float(g));
  const unsigned int hi = to_half(act_to_float(to_half(act_to_float(v >> 16) * r)) * act_to_float(g >> 16));
  return lo | (hi << 16);
}
#endif
extern "C" __global__ void __launch_bounds__(WARPS * 32) qvlq_int4_mma(
    const u4* __restrict__ qw, const u2* __restrict__ meta, const unsigned short* ACT_RESTRICT x,
    const float* __restrict__ bias, unsigned short* __restrict__ y, int K, int G, int ldx, int ldy,
    unsigned int zero, int half, const unsigned short* __restrict__ gamma, float eps,
    const unsigned short* ACT_RESTRICT resid, int ldr) {
  constexpr int GPS = CPG >= 4 ? 1 : 4 / CPG;  // groups met in one step
  constexpr int WH = GLU ? WARPS / 2 : WARPS;  // warps over the K steps of one set of tiles
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wk = warp % WH;
  const int gid = lane >> 2, tq = lane & 3;
  const int tile0 = blockIdx.x * TN + (warp / WH) * half, m = blockIdx.y;
  const int chunks = K / 64, steps = K / 256;
  const int s0 = wk * steps / WH, s1 = (wk + 1) * steps / WH;
  grid_release();
#if NORM
  // The row's RMSNorm into xs. x and gamma are loaded together (one round trip), the mean of squares summed
  // per thread, per warp and over the warps in a fixed order (deterministic). Called once the first weight
  // loads are in flight, so its latency hides behind theirs.
  __shared__ u4 xs[NORM / 8];
  __shared__ float ssq[WARPS * 32 + WARPS];
  auto norm_x = [&]() {
    constexpr int PER = (NORM / 8 + WARPS * 32 - 1) / (WARPS * 32);  // 16-byte loads a thread
    const u4* xr = reinterpret_cast<const u4*>(x + (u64)m * ldx);
    const u4* gr = reinterpret_cast<const u4*>(gamma);
    u4 xv[PER], gv[PER];
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = threadIdx.x + j * WARPS * 32;
      if (i < NORM / 8) { xv[j] = xr[i]; gv[j] = gr[i]; }
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      if (threadIdx.x + j * WARPS * 32 < NORM / 8) {
        const unsigned int h[4] = {xv[j].x, xv[j].y, xv[j].z, xv[j].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float lo = act_to_float(h[e]), hi = act_to_float(h[e] >> 16);
          ss += lo * lo + hi * hi;
        }
      }
    }
    ssq[threadIdx.x] = ss;
    __syncthreads();
    if (lane == 0) {
      float w = 0.f;
      for (int l = 0; l < 32; ++l) w += ssq[warp * 32 + l];
      ssq[WARPS * 32 + warp] = w;
    }
    __syncthreads();
    float tot = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) tot += ssq[WARPS * 32 + w];
    const float r = rsqrt_(tot / (float)NORM + eps);
#pragma unroll
    for (int j = 0; j < PER; ++j) {
      const int i = threadIdx.x + j * WARPS * 32;
      if (i < NORM / 8) {
        const u4 v = xv[j], g = gv[j];
        xs[i] = u4{norm2(v.x, g.x, r), norm2(v.y, g.y, r), norm2(v.z, g.z, r), norm2(v.w, g.w, r)};
      }
    }
    __syncthreads();
  };
#endif
  const unsigned int mask = 0x000F000Fu, magic = MAGIC, one = ONE2;
  float acc[TN][2];
#pragma unroll
  for (int t = 0; t < TN; ++t) acc[t][0] = acc[t][1] = 0.f;
  // one step's math on its operands in registers
  auto step = [&](const u4 (&wv)[TN][4], const u4 (&xv)[4][2], const u2 (&md)[TN][GPS]) {
#pragma unroll
    for (int t = 0; t < TN; ++t) {
      float d[4] = {0.f, 0.f, 0.f, 0.f}, e[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const u2 mi = md[t][CPG >= 4 ? 0 : i / CPG];
        const unsigned int z0 = (mi.y & 0xFFFFu) * 0x10001u, z1 = (mi.y >> 16) * 0x10001u;  // both halves
        const unsigned int w[4] = {wv[t][i].x, wv[t][i].y, wv[t][i].z, wv[t][i].w};
        const unsigned int b[8] = {xv[i][0].x, xv[i][0].y, xv[i][0].z, xv[i][0].w,
                                   xv[i][1].x, xv[i][1].y, xv[i][1].z, xv[i][1].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          unsigned int a[4];
#pragma unroll
          for (int p = 0; p < 4; ++p)  // magic + q, then + (-(magic + z)): q - z, exact
            a[p] = fma2(and_or(w[j] >> (4 * p), mask, magic), one, (p & 1) ? z1 : z0);
          mma((j & 1) ? e : d, a, b[2 * j], b[2 * j + 1]);  // two accumulator sets: back-to-back mma do not wait
        }
        if ((CPG < 4 && i % CPG == CPG - 1) || i == 3) {  // end of a group, or of the step
          acc[t][0] += fp16_to_float(mi.x) * (d[0] + e[0]);
          acc[t][1] += fp16_to_float(mi.x >> 16) * (d[2] + e[2]);
#pragma unroll
          for (int r = 0; r < 4; ++r) d[r] = e[r] = 0.f;
        }
      }
    }
  };
#if STAGES == 0
#if NORM
  const u4* xp = xs + tq * 2;
#else
  const u4* xp = reinterpret_cast<const u4*>(x + (u64)m * ldx) + tq * 2;
#endif
  auto load_w = [&](int s, u4 (&wv)[TN][4], u2 (&md)[TN][GPS]) {  // one step's weights and metadata
#pragma unroll
    for (int t = 0; t < TN; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[t][i] = qw[((u64)(tile0 + t) * chunks + s * 4 + i) * 32 + lane];
#pragma unroll
    for (int t = 0; t < TN; ++t)
#pragma unroll
      for (int q = 0; q < GPS; ++q) md[t][q] = meta[((u64)(tile0 + t) * G + s * 4 / CPG + q) * 8 + gid];
  };
  auto load_x = [&](int s, u4 (&xv)[4][2]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) { xv[i][0] = xp[(s * 4 + i) * 8]; xv[i][1] = xp[(s * 4 + i) * 8 + 1]; }
  };
  auto load = [&](int s, u4 (&wv)[TN][4], u4 (&xv)[4][2], u2 (&md)[TN][GPS]) {  // one step's operands
    load_w(s, wv, md);
    load_x(s, xv);
  };
  int first = s0;
#if NORM || PDL
  {  // the first step peeled: its weights in flight while the block waits for x and/or normalizes it
    u4 wv[TN][4], xv[4][2];
    u2 md[TN][GPS];
    if (s0 < s1) load_w(s0, wv, md);
    grid_wait();
#if NORM
    norm_x();
#endif
    if (s0 < s1) {
      load_x(s0, xv);
      step(wv, xv, md);
    }
    first = s0 + 1;
  }
#endif
  for (int s = first; s < s1; ++s) {
    u4 wv[TN][4], xv[4][2];
    u2 md[TN][GPS];
    load(s, wv, xv, md);
#if FENCE
    unsigned int all = 0;
#pragma unroll
    for (int t = 0; t < TN; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) all ^= wv[t][i].x;
#pragma unroll
      for (int q = 0; q < GPS; ++q) all ^= md[t][q].x;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) all ^= xv[i][0].x ^ xv[i][1].x;
    xv[0][0].x |= all & zero;
#endif
    step(wv, xv, md);
  }
#else
  // A ring of STAGES steps per warp in shared memory, filled by cp.async: while one step is computed the
  // next STAGES - 1 are in flight, and bytes in flight cost no registers (with registers, a warp holds one
  // step and the register file bounds the bytes in flight per SM). A slot: the warp's weights as each lane
  // loads them, the step's 256 inputs of x, its groups' metadata.
  struct Slot { u4 w[TN][4][32]; u4 x[32]; u2 m[TN][GPS][8]; };
  __shared__ Slot ring_all[WARPS][STAGES];
  Slot* ring = ring_all[warp];
#if !NORM
  const u4* xrow = reinterpret_cast<const u4*>(x + (u64)m * ldx);
#endif
  const int n = s1 - s0;
  auto issue_w = [&](int s, Slot& sl) {  // a step's weights
#pragma unroll
    for (int t = 0; t < TN; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        cp_async16(&sl.w[t][i][lane], &qw[((u64)(tile0 + t) * chunks + s * 4 + i) * 32 + lane]);
  };
  auto issue_m = [&](int s, Slot& sl) {  // its groups' metadata
    for (int e = lane; e < TN * GPS * 8; e += 32) {
      const int t = e / (GPS * 8), q = (e / 8) % GPS, r = e % 8;
      cp_async8(&sl.m[t][q][r], &meta[((u64)(tile0 + t) * G + s * 4 / CPG + q) * 8 + r]);
    }
  };
  auto issue = [&](int s, Slot& sl) {
    issue_w(s, sl);
#if !NORM  // else x is read from xs
    cp_async16(&sl.x[lane], &xrow[s * 32 + lane]);
#endif
    issue_m(s, sl);
  };
#if PDL && !NORM
  // The prologue's weights before the wait, their x after it, each in its own commit group: at step k the
  // STAGES - 1 newest groups are x of the prologue's steps after k and the full steps issued since, so
  // wait_group<STAGES - 1> still covers both halves of step k.
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {
    if (k < n) { issue_w(s0 + k, ring[k]); issue_m(s0 + k, ring[k]); }
    cp_async_commit();
  }
  grid_wait();
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {
    if (k < n) cp_async16(&ring[k].x[lane], &xrow[(s0 + k) * 32 + lane]);
    cp_async_commit();
  }
#else
#pragma unroll
  for (int k = 0; k < STAGES - 1; ++k) {  // one commit group per step, empty past the warp's last step
    if (k < n) issue(s0 + k, ring[k]);
    cp_async_commit();
  }
#endif
#if NORM
  grid_wait();
  norm_x();  // while the first steps are in flight
#endif
  for (int k = 0; k < n; ++k) {
    if (k + STAGES - 1 < n) issue(s0 + k + STAGES - 1, ring[(k + STAGES - 1) % STAGES]);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();  // this lane's copies of step k have landed
    sync_warp();  // and every other lane's
    const Slot& sl = ring[k % STAGES];
    u4 wv[TN][4], xv[4][2];
    u2 md[TN][GPS];
#pragma unroll
    for (int t = 0; t < TN; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) wv[t][i] = sl.w[t][i][lane];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#if NORM
      xv[i][0] = xs[(s0 + k) * 32 + i * 8 + tq * 2]; xv[i][1] = xs[(s0 + k) * 32 + i * 8 + tq * 2 + 1];
#else
      xv[i][0] = sl.x[i * 8 + tq * 2]; xv[i][1] = sl.x[i * 8 + tq * 2 + 1];
#endif
    }
#pragma unroll
    for (int t = 0; t < TN; ++t)
#pragma unroll
      for (int q = 0; q < GPS; ++q) md[t][q] = sl.m[t][q][gid];
    sync_warp();  // every lane has read the slot before the next iteration refills it
    step(wv, xv, md);
  }
#endif
  __shared__ float red[WARPS][TN * 16];
  if (tq == 0) {
#pragma unroll
    for (int t = 0; t < TN; ++t) { red[warp][t * 16 + gid] = acc[t][0]; red[warp][t * 16 + gid + 8] = acc[t][1]; }
  }
  __syncthreads();
  if (threadIdx.x < TN * 16) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < WH; ++w) sum += red[w][threadIdx.x];  // fixed order: deterministic
    const int n = blockIdx.x * TN * 16 + threadIdx.x;
    if (bias != nullptr) sum += bias[n];
#if GLU
    float gate = 0.f;
#pragma unroll
    for (int w = 0; w < WH; ++w) gate += red[WH + w][threadIdx.x];
    if (bias != nullptr) gate += bias[half * 16 + n];
    // as torch's eager ops on the two outputs: each rounded, silu in fp32 rounded, the product rounded
    const float a = act_to_float(to_half(sum)), g = act_to_float(to_half(gate));
    const float s = act_to_float(to_half(g / (1.f + expf(-g))));
    y[(u64)m * ldy + n] = to_half(a * s);
#elif RESID
    y[(u64)m * ldy + n] = to_half(act_to_float(resid[(u64)m * ldr + n]) + act_to_float(to_half(sum)));
#else
    y[(u64)m * ldy + n] = to_half(sum);
#endif
  }
}

// The dense weight for prefill (many rows: one GEMM beats re-reading the int4 weight per row):
// W[n, k] = s * (q - z) in fp32, rounded once to the output type, as `dequantize` computes it. One thread
// per packed word: its 8 codes are 4 consecutive inputs of rows g and g+8 (the lane map in the module
// docstring), so each row is one 8- or 16-byte store.
extern "C" __global__ void __launch_bounds__(256) qvlq_int4_dequant(
    const unsigned int* __restrict__ qw, const u2* __restrict__ meta, void* __restrict__ out, int K, int G,
    long long words, int out_f32) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= words) return;
  const int j = (int)(i & 3), lane = (int)((i >> 2) & 31), chunks = K / 64;
  const long long tc = i >> 7;  // tile * chunks + chunk
  const long long t = tc / chunks;
  const int c = (int)(tc % chunks), gid = lane >> 2, tq = lane & 3;
  const unsigned int w = qw[i];
  const u2 md = meta[((u64)t * G + c / CPG) * 8 + gid];
  const int k0 = c * 64 + 16 * tq + 4 * j;
#pragma unroll
  for (int h = 0; h < 2; ++h) {  // row g + 8h: registers h and h + 2, low and high halves
    const float sc = fp16_to_float(md.x >> (16 * h)), z = -act_to_float(md.y >> (16 * h)) - MAGIC_VALUE;
    const int nib[4] = {h, h + 4, h + 2, h + 6};  // inputs k0, k0 + 1, k0 + 2, k0 + 3
    float v[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = ((float)((w >> (4 * nib[e])) & 0xFu) - z) * sc;
    const u64 at = (u64)(t * 16 + gid + 8 * h) * K + k0;
    if (out_f32) {
      *reinterpret_cast<f4*>(reinterpret_cast<float*>(out) + at) = f4{v[0], v[1], v[2], v[3]};
    } else {
      const unsigned int lo = to_half(v[0]) | ((unsigned int)to_half(v[1]) << 16);
      const unsigned int hi = to_half(v[2]) | ((unsigned int)to_half(v[3]) << 16);
      *reinterpret_cast<u2*>(reinterpret_cast<unsigned short*>(out) + at) = u2{lo, hi};
    }
  }
}
"""


class Packed(NamedTuple):
    """The kernel's copy of one linear layer (see the module docstring)."""

    qweight: Tensor  # int32 [N/16, K/64, 32, 4]
    meta: Tensor  # int32 [N/16, G, 8, 2]
    group_size: int
    dtype: torch.dtype  # activation dtype the zero terms were built for (bf16 or fp16)

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * CHUNK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0] * 16

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.meta))


# ------------------------------------------------------------------------------------------ layout
def check_shape(out_features: int, in_features: int, group_size: int) -> str | None:
    """None if the kernel can serve this layer shape, else why not."""
    gs = in_features if group_size == -1 else group_size
    if out_features % 16:
        return f"out_features {out_features} is not a multiple of 16 (one mma tile)"
    if in_features % STEP:
        return f"in_features {in_features} is not a multiple of {STEP} (one loop step)"
    if gs % CHUNK or in_features % gs or (STEP % gs if gs < STEP else gs % STEP):
        return f"group size {gs} must be 64, 128 or a multiple of {STEP} dividing in_features {in_features}"
    return None


@functools.cache
def _lane_map(device: torch.device) -> tuple[Tensor, Tensor]:
    """For (lane, word j, nibble p): the row in the 16-row tile and the input in the 64-input chunk."""
    lane = torch.arange(32).view(32, 1, 1)
    j = torch.arange(4).view(1, 4, 1)
    p = torch.arange(8).view(1, 1, 8)
    reg, half = p % 4, p // 4  # register a_reg, low (code p) or high (code p + 4) half
    row = lane // 4 + 8 * (reg % 2)
    k = 16 * (lane % 4) + 4 * j + 2 * (reg // 2) + half
    return row.expand(32, 4, 8).to(device), k.expand(32, 4, 8).to(device)


def pack(codes: Tensor, zeros: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype = torch.bfloat16) -> Packed:
    """codes uint8 [N, K] (inputs in group-contiguous order), zeros [G, N] (the real zero point), scales
    [G, N] (fp16 values, as the checkpoint stores them) -> the kernel's layout, for activations of ``dtype``
    (bf16 or fp16). Exact."""
    n, k = codes.shape
    gs = k if group_size == -1 else group_size
    reason = check_shape(n, k, gs)
    if reason is not None:
        raise ValueError(reason)
    if dtype not in FORMATS:
        raise ValueError(f"activation dtype must be bfloat16 or float16, got {dtype}")
    g = int4_triton.check_values(codes, zeros, scales, gs, 127, " (magic value + zero must be exact in 16 bits)")
    s16 = scales.to(torch.float16)
    if not torch.equal(s16.float(), scales.float()):
        raise ValueError("scales must be fp16 values (the GPTQ checkpoint stores fp16)")
    row, kk = _lane_map(codes.device)
    tiles = codes.to(torch.int32).view(n // 16, 16, k // CHUNK, CHUNK).permute(0, 2, 1, 3)  # [T, C, 16, 64]
    nib = tiles[:, :, row, kk]  # [T, C, 32 lanes, 4 words, 8 nibbles]
    words = torch.zeros(nib.shape[:-1], dtype=torch.int32, device=codes.device)
    for p in range(8):  # int32 wraps: nibble 7 sets the sign bit
        words |= nib[..., p] << (4 * p)
    _, magic_value, _, _ = FORMATS[dtype]

    def rows16(v: Tensor) -> Tensor:  # [G, N] 16-bit values -> [T, G, 8] words: row g | row g+8 << 16
        bits = (v.view(torch.int16).to(torch.int32) & 0xFFFF).T.reshape(n // 16, 16, g).permute(0, 2, 1)
        return bits[..., :8] | (bits[..., 8:] << 16)  # int32 wraps: the high half may set the sign bit

    neg = (-(magic_value + zeros.float())).to(dtype)
    meta = torch.stack([rows16(s16), rows16(neg)], dim=-1)  # [T, G, 8, 2]
    return Packed(words.contiguous(), meta.contiguous(), gs, dtype)


def unpack(p: Packed) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of pack: codes uint8 [N, K], zeros int32 [G, N], scales fp32 [G, N]."""
    t, c = p.qweight.shape[:2]
    n, k, g = t * 16, c * CHUNK, p.meta.shape[1]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=p.qweight.device)
    nib = (p.qweight.unsqueeze(-1) >> shifts) & 0xF  # [T, C, 32, 4, 8]
    row, kk = _lane_map(p.qweight.device)
    tiles = torch.zeros(t, c, 16, CHUNK, dtype=torch.int32, device=p.qweight.device)
    tiles[:, :, row, kk] = nib
    codes = tiles.permute(0, 2, 1, 3).reshape(n, k).to(torch.uint8)
    scales = _rows16(p.meta[..., 0], torch.float16).permute(1, 0, 2).reshape(g, n)
    neg = _rows16(p.meta[..., 1], p.dtype)  # -(magic value + z)
    _, magic_value, _, _ = FORMATS[p.dtype]
    zeros = (-neg - magic_value).permute(1, 0, 2).reshape(g, n)
    return codes, zeros.round().to(torch.int32), scales


def _rows16(words: Tensor, dtype: torch.dtype) -> Tensor:
    """[T, G, 8] words of two 16-bit values (row g, row g+8) -> fp32 [T, G, 16] in row order."""
    halves = torch.cat([words & 0xFFFF, (words >> 16) & 0xFFFF], dim=-1)
    return halves.to(torch.int16).view(dtype).float()


def dequantize(p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [K, N] = s * (q - z) in fp32, rounded once to dtype (inputs in group order; a transposed view of an
    [N, K] tensor): the dense prefill path of the mma backend. On CUDA, for fp32 or the dtype p was packed
    for, one kernel (qvlq_int4_dequant, ~2.5 bytes of traffic per weight, no transient memory); elsewhere
    `dequantize_torch`, bit for bit the same values."""
    if p.qweight.is_cuda and dtype in (torch.float32, p.dtype) and runtime_error() is None:
        w = torch.ops.qvlq.int4_mma_dequantize(p.qweight, p.meta, p.group_size, p.dtype == torch.bfloat16,
                                               dtype == torch.float32)  # fmt: skip
        return w.T
    return dequantize_torch(p, dtype)


def dequantize_torch(p: Packed, dtype: torch.dtype = torch.float32) -> Tensor:
    """`dequantize` in torch operations, one nibble position at a time, so the transient memory stays ~1
    byte per weight besides the result (the profile reports a lean QuantLinear's peak memory)."""
    t, c = p.qweight.shape[:2]
    cpg = p.group_size // CHUNK
    _, magic_value, _, _ = FORMATS[p.dtype]
    row, kk = _lane_map(p.qweight.device)
    s = _rows16(p.meta[..., 0], torch.float16).repeat_interleave(cpg, dim=1)  # [T, C, 16]
    z = (-_rows16(p.meta[..., 1], p.dtype) - magic_value).repeat_interleave(cpg, dim=1)
    out = torch.empty(t, 16, c, CHUNK, dtype=dtype, device=p.qweight.device)  # [tile, row, chunk, input]
    for nib in range(8):
        r, i = row[..., nib], kk[..., nib]  # [32 lanes, 4 words]
        w = (((p.qweight >> (4 * nib)) & 0xF).float() - z[:, :, r]) * s[:, :, r]  # [T, C, 32, 4]
        out[:, r, :, i] = w.to(dtype).permute(2, 3, 0, 1)
    return out.view(t * 16, c * CHUNK).T


def reference(x: Tensor, p: Packed, bias: Tensor | None = None) -> Tensor:
    """The kernel's result by dense fp32 math, in x's dtype (torch operations only: no kernel of this module)."""
    y = x.float() @ dequantize_torch(p)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def emulate(x: Tensor, p: Packed, bias: Tensor | None = None) -> Tensor:
    """The kernel, lane by lane: the A registers built from each lane's words as the CUDA code builds them,
    B from each lane's two x loads, the mma as the PTX fragment layout defines it (fp32), then the
    per-group scale and the sum over groups. Tests check it against `reference`, so the packing, the
    register recipe and the fragment mapping are verified without a GPU."""
    m, k = x.shape
    t, c = p.qweight.shape[:2]
    g = p.meta.shape[1]
    cpg = p.group_size // CHUNK
    magic, _, _, _ = FORMATS[p.dtype]
    lane = torch.arange(32)
    gid, tq = lane // 4, lane % 4
    # A: a_p = ((w >> 4p) & 0x000F000F) | MAGIC, then + (-(M + z)) of row gid (p even) or gid + 8 (p odd)
    w = p.qweight.unsqueeze(-1)  # [T, C, 32, 4, 1]
    shifts = torch.arange(0, 16, 4, dtype=torch.int32)
    a = ((w >> shifts) & 0x000F000F) | magic  # [T, C, lane, j, reg]
    halves = torch.stack([a & 0xFFFF, (a >> 16) & 0xFFFF], -1).to(torch.int16).view(p.dtype).float()
    neg = _rows16(p.meta[..., 1], p.dtype).view(t, g, 2, 8)  # [T, G, half (rows g | g+8), gid]
    neg = neg.repeat_interleave(cpg, dim=1)[:, :, :, gid].transpose(2, 3)  # [T, C, lane, 2]: rows gid, gid + 8
    reg = torch.arange(4)
    vals = halves + neg[:, :, :, None, reg % 2, None]  # [T, C, lane, j, reg, half]: q - z, exact
    mat = torch.zeros(t, c, 4, 16, 16)  # A tile per (T, chunk, j): [row, mma k]
    rows = (gid[:, None] + 8 * (reg % 2)[None, :])[:, :, None].expand(32, 4, 2)
    kcol = (2 * tq[:, None, None] + 8 * (reg // 2)[None, :, None] + torch.arange(2)[None, None, :]).expand(32, 4, 2)
    mat[:, :, :, rows, kcol] = vals.permute(0, 1, 3, 2, 4, 5)
    # B: lane quad tq holds x[64c + 16tq + 4j + (0, 1)] for mma k 2tq+(0,1) and + (2, 3) for 2tq+8+(0,1)
    kappa = torch.arange(16)
    e, hi = kappa % 2, (kappa // 8)
    quad = (kappa % 8) // 2
    real = 16 * quad[None, :] + 4 * torch.arange(4)[:, None] + 2 * hi[None, :] + e[None, :]  # [j, 16]
    xb = x.float().view(m, c, CHUNK)[:, :, real]  # [M, C, j, 16]
    part = torch.einsum("tcjrk,mcjk->mtcr", mat, xb)  # [M, T, C, 16]: each chunk's mma sums
    per_group = part.view(m, t, g, cpg, 16).sum(3)
    s = _rows16(p.meta[..., 0], torch.float16)  # [T, G, 16]
    y = (per_group * s).sum(2).reshape(m, t * 16)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def layout_probe(
    run: Callable[[Tensor, Packed], Tensor],
    n: int = 32,
    k: int = 512,
    group_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    limit: int = 6,
) -> list[str]:
    """Where does a kernel take each weight's code, scale and zero from? ``run(x, p)`` must return x @ W for
    the packed layer p (the CUDA kernel, the host build, `emulate`). x is the identity (K rows), so the output
    is W itself; five packings make it spell out positions: codes = k % 16, (k // 16) % 16, (k // 256) % 16
    (the input k' whose code was used), scales = row + 1 (the row whose scale was used), zeros = row % 16
    (the row whose zero was used). Returns findings, [] when every weight is where it belongs: the first
    thing to run when the kernel meets a GPU (benchmarks/mma_diagnose.py)."""
    if n > 128 or k > 4096:
        raise ValueError("layout_probe tells apart up to 128 rows and 4096 inputs")
    g = k // (k if group_size == -1 else group_size)
    kk = torch.arange(k, device=device)
    rows = torch.arange(n, device=device)
    ones = torch.ones(g, n, device=device)
    x = torch.eye(k, device=device).to(dtype)

    def apply(codes: Tensor, zeros: Tensor, scales: Tensor) -> Tensor:
        y = run(x, pack(codes.to(torch.uint8), zeros, scales, group_size, dtype)).float()
        if not bool(torch.isfinite(y).all()) or not torch.equal(y, y.round()):
            raise _ProbeError("outputs are not the exact small integers the probe expects")
        return y.T.long()  # [N, K]: the value the kernel produced for (row n, input k)

    try:
        digits = [apply(((kk // d) % 16).expand(n, k), 0 * ones, ones) for d in (1, 16, 256)]
        used_k = digits[0] + 16 * digits[1] + 256 * digits[2]
        used_s = apply(torch.ones(n, k, device=device), 0 * ones, (rows + 1.0).expand(g, n)) - 1
        used_z = 15 - apply(torch.full((n, k), 15, device=device), (rows % 16).expand(g, n), ones)
    except _ProbeError as e:
        return [str(e)]
    findings = []
    lane_row, lane_k = _lane_map(torch.device("cpu"))

    def where(row: int, inp: int) -> str:  # lane, word and nibble that hold (row, input) in pack's layout
        hit = ((lane_row == row % 16) & (lane_k == inp % CHUNK)).nonzero()[0].tolist()
        return f"lane {hit[0]} word {hit[1]} nibble {hit[2]}"

    for what, got, want in (
        ("code of input", used_k, kk.expand(n, k)),
        ("scale of row", used_s, rows[:, None].expand(n, k)),
        ("zero of row", used_z, (rows % 16)[:, None].expand(n, k)),
    ):
        bad = (got != want).nonzero().tolist()
        if bad:
            findings.append(f"{len(bad)} of {n * k} weights use the wrong {what.split()[0]}")
            for r, i in bad[:limit]:
                extra = f" ({where(r, i)} -> {where(r, int(got[r, i]))})" if what == "code of input" else ""
                findings.append(f"  row {r} input {i}: {what} {int(got[r, i])} instead of {int(want[r, i])}{extra}")
    return findings


class _ProbeError(Exception):
    pass


# ------------------------------------------------------------------------------------------ runtime
def _candidates() -> list[str]:
    """Where libnvrtc may be: $QVLQ_NVRTC, PyTorch's nvidia-* wheels, the CUDA toolkit, the linker path."""
    found = [os.environ[ENV_NVRTC]] if os.environ.get(ENV_NVRTC) else []
    roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for root in dict.fromkeys(r for r in roots if r and os.path.isdir(r)):
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so*")), reverse=True)
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    found = [f for f in found if "builtins" not in os.path.basename(f)]
    # several CUDA majors installed (cu12 and cu13 wheels): the one PyTorch was built with first
    major = (torch.version.cuda or "").split(".")[0]
    found.sort(key=lambda f: not (major and f".so.{major}" in os.path.basename(f)))
    return found + ["libnvrtc.so", f"libnvrtc.so.{major or 13}", "libnvrtc.so.13", "libnvrtc.so.12"]


@functools.cache
def _nvrtc() -> ctypes.CDLL:
    errors = []
    for name in _candidates():
        try:
            # NVRTC dlopens its builtins library by name; wheels ship it beside libnvrtc without an rpath
            builtins = sorted(glob.glob(os.path.join(os.path.dirname(name), "libnvrtc-builtins.so.*")))
            for b in (f for f in builtins if ".alt." not in f) if os.path.dirname(name) else ():
                ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e).split(":")[-1].strip())
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise RuntimeError(f"libnvrtc not found (set {ENV_NVRTC}=/path/to/libnvrtc.so); tried {len(errors)} places")


def runtime_error() -> str | None:
    """None if libnvrtc and libcuda load, else why not (checked before choosing this backend)."""
    try:
        _nvrtc()
        libcuda()
    except (RuntimeError, OSError) as e:
        return f"int4_mma needs libnvrtc and libcuda: {e}"
    return None


def defines(dtype: torch.dtype, group_size: int, cfg: Config) -> dict[str, str]:
    """The preprocessor definitions that specialise SOURCE."""
    magic, _, kind, one = FORMATS[dtype]
    return {
        "MAGIC": f"0x{magic:08X}u",
        "ONE2": f"0x{one:08X}u",
        "MMA": f'"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32"',
        "FMA2": f'"fma.rn.{kind}x2"',
        "CVT": f'"cvt.rn.{kind}.f32"',
        "CPG": str(group_size // CHUNK),
        "WARPS": str(cfg.threads // 32),
        "TN": str(cfg.tiles),
        "FENCE": str(cfg.fence),
        "STAGES": str(cfg.stages),
        "GLU": str(cfg.glu),
        "NORM": str(cfg.norm),
        "RESID": str(cfg.resid),
        "PDL": str(cfg.pdl),
        "ACT_BF16": str(int(dtype == torch.bfloat16)),
        "MAGIC_VALUE": f"{FORMATS[dtype][1]:.1f}f",
    }


def _options(arch: str, defs: dict[str, str]) -> list[str]:
    return [f"--gpu-architecture={arch}", "--std=c++17", *(f"-D{k}={v}" for k, v in defs.items())]


def compile_cubin(arch: str, defs: dict[str, str]) -> bytes:
    """SOURCE -> CUBIN for arch (e.g. "sm_90") with NVRTC; a compile error raises with NVRTC's log."""
    lib = _nvrtc()
    prog = ctypes.c_void_p()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            log = ""
            size = ctypes.c_size_t()
            if lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)) == 0 and size.value > 1:
                buf = ctypes.create_string_buffer(size.value)
                lib.nvrtcGetProgramLog(prog, buf)
                log = buf.value.decode(errors="replace").strip()
            raise RuntimeError(f"NVRTC {what}: {lib.nvrtcGetErrorString(rc).decode()} {log}".strip())

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), SOURCE.encode(), b"qvlq_int4_mma.cu", 0, None, None), "create")
    try:
        opts = _options(arch, defs)
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        check(lib.nvrtcCompileProgram(prog, len(opts), arr), "compile")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        buf = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, buf), "cubin")
        return buf.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def nvrtc_version() -> str:
    major, minor = ctypes.c_int(), ctypes.c_int()
    rc = _nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return f"{major.value}.{minor.value}" if rc == 0 else "unknown"


ELF_MAGIC = b"\x7fELF"


def cache_path(arch: str, defs: dict[str, str]) -> Path | None:
    """Where cubin() keeps the CUBIN of (SOURCE, arch, defs) for this NVRTC; None with the cache off."""
    root = user_cache_dir()
    if root is None:
        return None
    key = hashlib.sha256(repr((SOURCE, _options(arch, defs), nvrtc_version())).encode()).hexdigest()[:32]
    return root / "int4_mma" / f"{arch}-{key}.cubin"


@functools.cache
def cubin(arch: str, dtype: torch.dtype, group_size: int, cfg: Config) -> bytes:
    """compile_cubin of one config, kept in memory and on disk (io.user_cache_dir()): a tune compiles some 50
    configs at ~0.3 s each, and every later process (the next engine build or benchmark step) reuses them."""
    defs = defines(dtype, group_size, cfg)
    path = cache_path(arch, defs)
    if path is not None:
        try:
            data = path.read_bytes()
            if data[:4] == ELF_MAGIC:  # anything else (a truncated copy, a stray file) is rebuilt
                return data
        except OSError:
            pass
    data = compile_cubin(arch, defs)
    if path is not None:
        try:
            atomic_write_bytes(path, data)
        except OSError:  # a read-only cache: this process still has it in memory
            pass
    return data


def precompile(
    device_index: int, dtype: torch.dtype, group_size: int, configs: Sequence[Config], workers: int = 8
) -> None:
    """cubin() of each config in threads (NVRTC runs outside the GIL): a cold tune's compiles take ~1/cores of
    the time. Errors are left for the tuner, which meets them again one config at a time and records them."""
    arch = "sm_{}{}".format(*_capability(device_index))

    def build(cfg: Config) -> None:
        try:
            cubin(arch, dtype, group_size, cfg)
        except Exception:  # reported by the tuner
            pass

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(configs), os.cpu_count() or 1))) as pool:
        list(pool.map(build, configs))


@functools.cache
def _function(device_index: int, dtype: torch.dtype, group_size: int, cfg: Config, name: str) -> ctypes.c_void_p:
    """One kernel of SOURCE compiled for one device (the module kept alive in _MODULES). The dequantize
    kernel ignores the config: it is taken from the module compiled for DEFAULT_CONFIG."""
    module = _module(device_index, dtype, group_size, cfg)
    fn = ctypes.c_void_p()
    check_cu(libcuda().cuModuleGetFunction(ctypes.byref(fn), module, name.encode()), f"cuModuleGetFunction {name}")
    return fn


@functools.cache
def _module(device_index: int, dtype: torch.dtype, group_size: int, cfg: Config) -> ctypes.c_void_p:
    data = cubin("sm_{}{}".format(*_capability(device_index)), dtype, group_size, cfg)
    with torch.cuda.device(device_index):
        current_context(device_index)
        module = ctypes.c_void_p()
        check_cu(libcuda().cuModuleLoadData(ctypes.byref(module), data), "cuModuleLoadData")
    _MODULES.append(module)
    return module


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): a 4-byte id, padding to 8, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h), the argument of cuLaunchKernelEx."""

    _fields_ = [(n, ctypes.c_uint) for n in ("gridDimX", "gridDimY", "gridDimZ", "blockDimX", "blockDimY", "blockDimZ",
                                             "sharedMemBytes")]  # fmt: skip
    _fields_ += [("hStream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)), ("numAttrs", ctypes.c_uint)]


ATTR_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _cu_launch(
    fn: ctypes.c_void_p, index: int, grid: tuple[int, int], block: int, args: list[Any], pdl: bool = False
) -> None:  # fmt: skip
    """cuLaunchKernel on the current stream of device `index` (the context the module was loaded in); with pdl,
    cuLaunchKernelEx with programmatic stream serialization (the kernel may start before the previous one ends)."""
    with torch.cuda.device(index):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])  # ~5x cheaper than cast
        if not pdl:
            rc = libcuda().cuLaunchKernel(fn, grid[0], grid[1], 1, block, 1, 1, 0, stream, params, None)
            check_cu(rc, "cuLaunchKernel")
            return
        attr = LaunchAttribute(id=ATTR_PROGRAMMATIC_STREAM_SERIALIZATION)
        attr.value[0] = 1  # programmaticStreamSerializationAllowed
        cfg = LaunchConfig(grid[0], grid[1], 1, block, 1, 1, 0, stream.value, ctypes.pointer(attr), 1)
        check_cu(libcuda().cuLaunchKernelEx(ctypes.byref(cfg), fn, params, None), "cuLaunchKernelEx")


_MODULES: list[ctypes.c_void_p] = []


def _check_packed(p: Packed, device: torch.device) -> None:
    """pack() output always passes; anything else must too: the kernels read it with 16- and 8-byte loads."""
    for t in (p.qweight, p.meta):
        if not t.is_contiguous() or t.data_ptr() % 16 or t.device != device:
            raise ValueError(f"packed weight must be contiguous, 16-byte aligned and on {device}")


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _check_fused(x: Tensor, n_out: int, cfg: Config, gamma: Tensor | None, resid: Tensor | None) -> None:
    """The norm prologue's and the residual epilogue's operands, as the config asks for them."""
    if cfg.norm and (cfg.norm != x.shape[1] or gamma is None or gamma.shape != (cfg.norm,) or gamma.dtype != x.dtype):
        raise ValueError(f"config {cfg.name}: needs x of {cfg.norm} features and gamma [{cfg.norm}] in {x.dtype}")
    if cfg.resid and (resid is None or resid.shape != (x.shape[0], n_out) or resid.dtype != x.dtype):
        raise ValueError(f"config {cfg.name}: needs resid [{x.shape[0]}, {n_out}] in {x.dtype}")
    if (gamma is not None and not cfg.norm) or (resid is not None and not cfg.resid):
        raise ValueError(f"config {cfg.name}: gamma goes with norm, resid with resid")


def launch(
    x: Tensor, p: Packed, bias: Tensor | None, cfg: Config = DEFAULT_CONFIG, out: Tensor | None = None,
    gamma: Tensor | None = None, eps: float = 0.0, resid: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """y [M, N] = x [M, K] @ W (+ bias fp32) on CUDA, in x's dtype (must be the dtype p was packed for);
    with cfg.glu, y [M, N/2] = a * silu(b) of the two halves of that product; cfg.norm: x is first
    rms_norm(x, gamma, eps); cfg.resid: y = resid + y (see Config)."""
    m, k = x.shape
    if k != p.in_features:
        raise ValueError(f"x has {k} features, the weight {p.in_features}")
    if x.dtype != p.dtype:
        raise ValueError(f"x is {x.dtype}, the weight was packed for {p.dtype} activations")
    n_out = p.out_features // 2 if cfg.glu else p.out_features
    if n_out % (16 * cfg.tiles) or (cfg.glu and p.out_features % 32):
        raise ValueError(f"config {cfg.name}: out_features {p.out_features} does not split into its blocks")
    _check_packed(p, x.device)
    _check_fused(x, n_out, cfg, gamma, resid)
    if cfg.pdl and _capability(_index(x.device)) < PDL_CAPABILITY:
        raise ValueError(f"config {cfg.name}: programmatic dependent launch needs compute capability 9.0+")
    if bias is not None and bias.numel() != p.out_features:
        raise ValueError(f"bias has {bias.numel()} values, the layer {p.out_features} outputs")
    if x.stride(1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:  # rows are read with 16-byte loads
        x = x.contiguous().clone() if x.data_ptr() % 16 else x.contiguous()
    g = None if gamma is None else gamma.contiguous() if gamma.data_ptr() % 16 == 0 else gamma.clone()
    r = None if resid is None else resid if resid.stride(1) == 1 else resid.contiguous()
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return y
    index = _index(x.device)
    fn = _function(index, p.dtype, p.group_size, cfg, "qvlq_int4_mma")
    b = None if bias is None else bias.float().contiguous()
    for r0 in range(0, m, MAX_GRID_Y):  # grid.y is at most 65535 rows
        rows = min(MAX_GRID_Y, m - r0)
        args = [
            ctypes.c_void_p(p.qweight.data_ptr()), ctypes.c_void_p(p.meta.data_ptr()),
            ctypes.c_void_p(x[r0].data_ptr()), ctypes.c_void_p(b.data_ptr() if b is not None else 0),
            ctypes.c_void_p(y[r0].data_ptr()), ctypes.c_int(k), ctypes.c_int(p.meta.shape[1]),
            ctypes.c_int(x.stride(0)), ctypes.c_int(y.stride(0)), ctypes.c_uint(0), ctypes.c_int(n_out // 16),
            ctypes.c_void_p(g.data_ptr() if g is not None else 0), ctypes.c_float(eps),
            ctypes.c_void_p(0 if r is None else r[r0].data_ptr()), ctypes.c_int(0 if r is None else r.stride(0)),
        ]  # fmt: skip
        _cu_launch(fn, index, (n_out // (16 * cfg.tiles), rows), cfg.threads, args, bool(cfg.pdl))
    return y


def launch_dequantize(p: Packed, out_f32: bool) -> Tensor:
    """W [N, K] on CUDA by the qvlq_int4_dequant kernel: fp32, or the dtype p was packed for."""
    if not p.qweight.is_cuda:
        raise ValueError("launch_dequantize needs the packed weight on a CUDA device")
    _check_packed(p, p.qweight.device)
    index = _index(p.qweight.device)
    dtype = torch.float32 if out_f32 else p.dtype
    out = torch.empty(p.out_features, p.in_features, dtype=dtype, device=p.qweight.device)
    words = p.qweight.numel()
    args = [
        ctypes.c_void_p(p.qweight.data_ptr()), ctypes.c_void_p(p.meta.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int(p.in_features), ctypes.c_int(p.meta.shape[1]), ctypes.c_longlong(words), ctypes.c_int(out_f32),
    ]  # fmt: skip
    fn = _function(index, p.dtype, p.group_size, DEFAULT_CONFIG, "qvlq_int4_dequant")
    _cu_launch(fn, index, ((words + 255) // 256, 1), 256, args)
    return out


# ------------------------------------------------------------------------------------------ custom op
# torch.compile(fullgraph=True) traces QuantLinear.forward: the ctypes launch must be opaque to dynamo.
@torch.library.custom_op("qvlq::int4_mma_gemv", mutates_args=())
def _int4_mma_op(
    x: Tensor,
    qweight: Tensor,
    meta: Tensor,
    bias: Tensor | None,
    group_size: int,
    warps: int,
    tiles: int,
    fence: int,
    stages: int,
    glu: int,
    norm: int,
    resid_flag: int,
    pdl: int,
    gamma: Tensor | None,
    eps: float,
    resid: Tensor | None,
) -> Tensor:
    cfg = Config(warps, tiles, fence, stages, glu, norm, resid_flag, pdl)
    if x.device.type == "cuda":
        return launch(x, Packed(qweight, meta, group_size, x.dtype), bias, cfg, gamma=gamma, eps=eps, resid=resid)
    # CPU: the model's ops around the lane-by-lane model of the kernel
    n_out = qweight.shape[0] * (8 if glu else 16)
    _check_fused(x, n_out, cfg, gamma, resid)
    packed = Packed(qweight, meta, group_size, x.dtype)
    return unfused(x, cfg, gamma, eps, resid, lambda xn: emulate(xn, packed, bias))


@_int4_mma_op.register_fake
def _(x, qweight, meta, bias, group_size, warps, tiles, fence, stages, glu, norm, resid_flag, pdl, gamma, eps, resid):
    return x.new_empty(x.shape[0], qweight.shape[0] * (8 if glu else 16))


@torch.library.custom_op("qvlq::int4_mma_dequantize", mutates_args=())
def _dequantize_op(qweight: Tensor, meta: Tensor, group_size: int, act_bf16: bool, out_f32: bool) -> Tensor:
    return launch_dequantize(Packed(qweight, meta, group_size, torch.bfloat16 if act_bf16 else torch.float16), out_f32)


@_dequantize_op.register_fake
def _(qweight, meta, group_size, act_bf16, out_f32):
    dtype = torch.float32 if out_f32 else torch.bfloat16 if act_bf16 else torch.float16
    return qweight.new_empty(qweight.shape[0] * 16, qweight.shape[1] * CHUNK, dtype=dtype)


def swiglu(a: Tensor, b: Tensor) -> Tensor:
    """Qwen's MLP gate, a * silu(b), in torch's eager ops: what the kernel's glu epilogue computes."""
    return a * torch.nn.functional.silu(b)


def unfused(
    x: Tensor, cfg: Config, gamma: Tensor | None, eps: float, resid: Tensor | None, product: Callable[[Tensor], Tensor]
) -> Tensor:  # fmt: skip
    """What a variant computes, as the model's ops around a plain product (x -> x @ W + bias): RMSNorm first
    (cfg.norm), the gate of the two stacked halves (cfg.glu), the residual add (cfg.resid)."""
    y = product(rms_norm(x, gamma, eps) if cfg.norm else x)
    y = swiglu(*y.chunk(2, dim=-1)) if cfg.glu else y
    return resid + y if cfg.resid else y


def gemv(
    x: Tensor, p: Packed, bias: Tensor | None = None, cfg: Config = DEFAULT_CONFIG, gamma: Tensor | None = None,
    eps: float = 0.0, resid: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """y [M, N] = x [M, K] @ W (+ bias, added in fp32), in x's dtype: the kernel on CUDA, `emulate` on CPU;
    with cfg.glu, [M, N/2] = swiglu of the two halves; cfg.norm: of rms_norm(x, gamma, eps); cfg.resid: plus
    resid."""
    if x.dtype != p.dtype:
        raise ValueError(f"x is {x.dtype}, the weight was packed for {p.dtype} activations")
    return torch.ops.qvlq.int4_mma_gemv(x.contiguous(), p.qweight, p.meta, bias, p.group_size, *cfg, gamma, eps, resid)


# ------------------------------------------------------------------------------------------ tuning
class TuneResult(NamedTuple):
    best: Config
    seconds: dict[str, float]  # config name -> median seconds per call
    dropped: dict[str, str]  # config name -> why (error, mismatch, shape)


TUNED: dict[tuple, TuneResult] = {}  # (N, K, group, dtype) -> result


def l2_copies(p: Packed) -> list[Packed]:
    """p and enough copies of it that they do not fit in L2: a timing rotates through them, as a decode step
    meets 160 different layers."""
    n = int4_triton.copies_for_l2(p.nbytes(), p.qweight.device)
    return [p] + [Packed(p.qweight.clone(), p.meta.clone(), p.group_size, p.dtype) for _ in range(n - 1)]


@torch.no_grad()
def tune(p: Packed, bias: Tensor | None = None, calls: int = 200, repeats: int = 5, seed: int = 0) -> TuneResult:
    """Check each configuration against the reference at one row, time the ones that match (CUDA graph of
    many calls, weight copies rotated past L2, as int4_triton.tune) and keep the fastest."""
    dev = p.qweight.device
    if dev.type != "cuda":
        raise ValueError("tune() needs the packed weight on a CUDA device")
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(1, p.in_features, device=dev, generator=gen).to(p.dtype)
    ref = reference(x.float(), p, bias)
    ps = l2_copies(p)
    n_copies = len(ps)
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    configs = configs_for(dev)
    precompile(_index(dev), p.dtype, p.group_size, configs)
    for cfg in configs:
        if p.out_features % (16 * cfg.tiles):
            dropped[cfg.name] = f"out_features not a multiple of {16 * cfg.tiles}"
            continue
        try:
            bad = int4_triton.mismatch(gemv(x, p, bias, cfg), ref)
            if bad:
                dropped[cfg.name] = f"mismatch: {bad}"
                continue
            call = lambda i, c=cfg: gemv(x, ps[i % n_copies], bias, c)  # noqa: E731
            seconds[cfg.name] = int4_triton.time_graph(call, calls, repeats)
        except Exception as e:  # compile or launch errors: drop the configuration
            torch.cuda.synchronize(dev)
            dropped[cfg.name] = int4_triton.error_line(e)
    if not seconds:
        raise RuntimeError(f"no int4_mma configuration works for N={p.out_features} K={p.in_features}: {dropped}")
    by_name = {c.name: c for c in configs}
    return TuneResult(by_name[min(seconds, key=seconds.__getitem__)], seconds, dropped)


def tuned(p: Packed) -> TuneResult:
    """tune() once per (N, K, group, dtype): cached in TUNED, and on disk (qvlq.tuning)."""
    key = (p.out_features, p.in_features, p.group_size, p.dtype)
    if key not in TUNED:
        dev = p.qweight.device
        TUNED[key] = remember_tune(
            "int4_mma", key, configs_for(dev), __file__, dev, lambda: tune(p), TuneResult, Config
        )
    return TUNED[key]


def best_config(p: Packed) -> Config:
    """The tuned configuration for this layer's shape; DEFAULT_CONFIG off CUDA."""
    return tuned(p).best if p.qweight.device.type == "cuda" else DEFAULT_CONFIG


# A variant's block differs from its plain config's (prologue, twice the warps, shared memory), so the plain
# tuner's winner need not be the variant's: tuned_variant times the variants of the layer's own config and
# of the next fastest plain configs of its shape (NVRTC ~0.2 s a compile: ~1 s a variant and shape).
VARIANT_CANDIDATES = 5
FUSED_TOL = 1e-2  # relative error of a fused launch against the model's ops: RMSNorm's fp32 sum order; a bug is O(1)
VARIANT_TUNED: dict[tuple, TuneResult] = {}  # (N, K, group, dtype, flags) -> result, filled by tuned_variant()


@torch.no_grad()
def tune_variant(
    p: Packed, bias: Tensor | None, flags: dict[str, int], candidates: Sequence[Config], calls: int = 200,
    repeats: int = 5, seed: int = 0, timer: Callable[..., float] | None = None,
) -> TuneResult:  # fmt: skip
    """The fastest of the candidates' variants with `flags` (variant()'s glu / norm / resid) for the weight p
    (glu: the two layers stacked): each checked at one row against its plain config with the model's ops
    around it (`unfused`; relative error under FUSED_TOL), then timed as tune() times (timer: time_graph,
    CUDA). Candidates whose variant does not fit a block are dropped with the reason."""
    dev = p.qweight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    k, glu = p.in_features, bool(flags.get("glu"))
    n_out = p.out_features // 2 if glu else p.out_features
    x = torch.randn(1, k, device=dev, generator=gen).to(p.dtype)
    gamma = (1 + 0.1 * torch.randn(k, device=dev, generator=gen)).to(p.dtype) if flags.get("norm") else None
    resid = torch.randn(1, n_out, device=dev, generator=gen).to(p.dtype) if flags.get("resid") else None
    eps = 1e-6
    timer = timer or int4_triton.time_graph
    ps = l2_copies(p) if dev.type == "cuda" else [p]
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    by_name: dict[str, Config] = {}
    if dev.type == "cuda":
        fitting = (variant(c._replace(glu=0, norm=0, resid=0), p.group_size, **flags) for c in candidates)
        precompile(_index(dev), p.dtype, p.group_size, [v for v in fitting if v is not None])
    for base in candidates:
        base = base._replace(glu=0, norm=0, resid=0)
        v = variant(base, p.group_size, **flags)
        if v is None:
            dropped[f"{base.name}-{flags_name(flags)}"] = "over the threads or shared memory of a block"
            continue
        if v.name in by_name or v.name in dropped:
            continue
        if n_out % (16 * v.tiles):
            dropped[v.name] = f"{n_out} outputs do not split into blocks of {16 * v.tiles}"
            continue
        try:
            want = unfused(x, v, gamma, eps, resid, lambda xn, c=base: gemv(xn, p, bias, c))
            err = int4_triton.rel_error(gemv(x, p, bias, v, gamma, eps, resid), want)
            if not err < FUSED_TOL:
                dropped[v.name] = f"mismatch: relative error {err:.2e} against the unfused ops"
                continue
            call = lambda i, c=v: gemv(x, ps[i % len(ps)], bias, c, gamma, eps, resid)  # noqa: E731
            seconds[v.name] = timer(call, calls, repeats)
            by_name[v.name] = v
        except Exception as e:  # compile or launch errors: drop the candidate
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dropped[v.name] = int4_triton.error_line(e)
    if not seconds:
        raise RuntimeError(f"no {flags_name(flags)} variant works for N={p.out_features} K={k}: {dropped}")
    return TuneResult(by_name[min(seconds, key=seconds.__getitem__)], seconds, dropped)


def fastest_first(seconds: dict[str, float]) -> list[Config]:
    """The configs a tuner timed (config name -> time), fastest first."""
    by_name = {c.name: c for c in CONFIGS + PDL_CONFIGS}
    return [by_name[n] for n in sorted(seconds, key=seconds.__getitem__)]


def ranked_configs(first: Config, shape: Packed, k: int = VARIANT_CANDIDATES) -> list[Config]:
    """first, then the other configs that tune() timed on shape's (N, K, group, dtype), fastest first: k in all."""
    res = TUNED.get((shape.out_features, shape.in_features, shape.group_size, shape.dtype))
    return [first, *(c for c in fastest_first(res.seconds if res else {}) if c != first)][:k]


def tuned_variant(
    p: Packed, bias: Tensor | None, flags: dict[str, int], first: Config, ranked_by: Packed
) -> TuneResult:  # fmt: skip
    """tune_variant over ranked_configs(first, ranked_by) (ranked_by: the layer, or one of the two stacked
    layers), once per (N, K, group, dtype, flags): cached in VARIANT_TUNED."""
    key = (p.out_features, p.in_features, p.group_size, p.dtype, flags_name(flags))
    if key not in VARIANT_TUNED:
        candidates = ranked_configs(first, ranked_by)
        VARIANT_TUNED[key] = remember_tune(
            "int4_mma variant", key, candidates, __file__, p.qweight.device,
            lambda: tune_variant(p, bias, flags, candidates), TuneResult, Config,
        )  # fmt: skip
    return VARIANT_TUNED[key]


def variant_selection() -> list[dict[str, Any]]:
    """What tuned_variant measured, one entry per (shape, flags) (for reports)."""
    return [
        {"out_features": k[0], "in_features": k[1], "group_size": k[2], "dtype": str(k[3]).removeprefix("torch."),
         "variant": k[4], "choice": r.best.name, "us": r.seconds[r.best.name] * 1e6,
         "configs_us": {n: s * 1e6 for n, s in r.seconds.items()}, "dropped": dict(r.dropped)}
        for k, r in VARIANT_TUNED.items()
    ]  # fmt: skip
