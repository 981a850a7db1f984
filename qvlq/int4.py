"""AutoGPTQ v1 checkpoint format (as in Qwen-VL-Chat-Int4) and a quantized linear layer.

Per layer (in I, out O, b bits, n_groups G):
    qweight int32 [I*b/32, O]   codes packed along the input dim
    qzeros  int32 [G, O*b/32]   (zero - 1) packed along the output dim (the "v1" offset)
    scales  fp16  [G, O]
    g_idx   int32 [I]           group of each input column
    bias    fp16  [O]           always present (zeros when the float layer had none)
    W[o, i] = scales[g_idx[i], o] * (code[i, o] - (zero_stored[g_idx[i], o] + 1))

Packing is a little-endian bit stream per column: value k of a run sits at bits b*k.. of the run's
words. For 2/4/8 bit every word holds 32/b whole values (4 bit: qweight[r, o] holds code[8r + j, o] at
bits 4j..4j+3). For 3 bit, 32 values fill 3 words and values 10 and 21 straddle word boundaries,
which is AutoGPTQ's 3-bit layout.

v1 limitation: a zero point of 0 would be stored as -1, which the format cannot hold (it reads back as
2^b), so packing refuses it. Symmetric quantization (zero = 2^(b-1)) never hits this, and qvlq's
asymmetric GPTQ/RTN never produce it (qvlq.gptq gives such groups zero 1 and a stretched scale).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvlq import int4_mma, int4_triton
from qvlq.gptq import QuantResult
from qvlq.tuning import digest, remember

BACKENDS = ("auto", "fastest", "dequant", "int4_cpu", "int4_cuda", "triton", "mma")
# Read in one place (QuantLinear._choose): what prepare("auto") means for layers on CUDA, e.g. to
# profile a kernel without code changes: QVLQ_INT4_BACKEND=mma|triton|int4_cuda|fastest|dequant.
ENV_BACKEND = "QVLQ_INT4_BACKEND"
KERNEL_GROUP_SIZES = (256, 128, 64, 32)  # what torch's int4 kernels accept for qGroupSize
# Row count from which an int4 backend dequantizes the weight per call and runs one dense GEMM instead
# (QuantLinear.dequant_rows). H200, bf16, 11008x4096: tinygemm 0.81 / 1.61 / 6.38 ms at 256 / 512 / 2048
# rows vs dequantize + GEMM 0.87 / 0.90 / 1.07 ms (4096x4096: 0.31 / 0.61 / 2.39 vs 0.36 / 0.37 / 0.43).
# CPU (Xeon, AVX-512, 2 threads, 4096x4096, bf16): the int4 kernel takes 0.9 ms at 1 row but 307 ms at
# 512 rows, where a dense bf16 GEMM takes 36-48 ms; 128 is an estimate of the crossover.
# triton, mma: their kernels re-read the weight once per row (GEMVs, not GEMMs); 32 is an estimate.
DEQUANT_ROWS: dict[str, int | None] = {"int4_cpu": 128, "int4_cuda": 512, "triton": 32, "mma": 32}
CUDA_KERNELS = ("int4_cuda", "triton", "mma")  # what prepare("fastest") times against each other
ENV_CANDIDATES = "QVLQ_INT4_CANDIDATES"  # e.g. int4_cuda,mma: what "fastest" times (a long profile skips one)
# prepare("fastest"): per (out, in, group, dtype), the measured choice and timings (each usable CUDA kernel at
# one row, CUDA graph of many calls), measured once per distinct shape; read it with fastest_choices().
FASTEST: dict[tuple[int, int, int, str], dict[str, Any]] = {}


def backend_problem(backend: str, device: torch.device) -> str | None:
    """Why the Int4 layers cannot run `backend` on `device` (a phrase for an option's name to lead), else None."""
    if backend not in BACKENDS:
        return f"must be one of {', '.join(BACKENDS)}, got {backend!r}"
    if device.type != "cuda" and backend in CUDA_KERNELS:
        return f"{backend} needs a CUDA device; on {device} use fastest, auto or dequant"
    if device.type == "cuda" and backend == "int4_cpu":
        return f"int4_cpu runs on the CPU; on {device} use fastest, auto, {', '.join(CUDA_KERNELS)} or dequant"
    return None


def env_backend() -> str | None:
    """The backend QVLQ_INT4_BACKEND asks 'auto' to use on CUDA, or None when unset."""
    value = os.environ.get(ENV_BACKEND, "").strip()
    if not value:
        return None
    if value not in ("fastest", "dequant", *CUDA_KERNELS):
        raise ValueError(f"{ENV_BACKEND}={value!r}: expected mma, triton, int4_cuda, fastest or dequant")
    return value


def fastest_candidates() -> tuple[str, ...]:
    """The CUDA kernels prepare("fastest") may time: $QVLQ_INT4_CANDIDATES (comma list), else all of them."""
    value = os.environ.get(ENV_CANDIDATES, "").strip()
    if not value:
        return CUDA_KERNELS
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [n for n in names if n not in CUDA_KERNELS]
    if bad or not names:
        raise ValueError(f"{ENV_CANDIDATES}={value!r}: expected a comma list of {', '.join(CUDA_KERNELS)}")
    return names


def fastest_choices() -> list[dict[str, Any]]:
    """What prepare("fastest") measured and chose, one entry per distinct layer shape (for reports)."""
    return [dict(v) for v in FASTEST.values()]


def _fastest_record(d: Any) -> dict[str, Any]:
    """A "fastest" record read back from the tuning cache (qvlq.tuning), checked for the one key used."""
    if not isinstance(d, dict) or d.get("choice") not in CUDA_KERNELS:
        raise ValueError(f"not a fastest record: {d!r:.80}")
    return dict(d)


def kernel_selection() -> list[dict[str, Any]]:
    """What this process measured to pick int4 kernels, one entry per layer shape (for reports): the
    prepare("fastest") choices, else the tuning results of prepare("triton") / prepare("mma"); [] when
    nothing was timed."""
    if FASTEST:
        return fastest_choices()
    triton = [
        {"out_features": k[0], "in_features": k[1], "group_size": k[2], "dtype": str(k[4]).removeprefix("torch."),
         "choice": "triton", "triton_us": r.seconds[r.best.name] * 1e6, "triton_config": r.best.name}
        for k, r in int4_triton.TUNED.items()
    ]  # fmt: skip
    mma = [
        {"out_features": k[0], "in_features": k[1], "group_size": k[2], "dtype": str(k[3]).removeprefix("torch."),
         "choice": "mma", "mma_us": r.seconds[r.best.name] * 1e6, "mma_config": r.best.name}
        for k, r in int4_mma.TUNED.items()
    ]  # fmt: skip
    return triton + mma


def _run(bits: int) -> tuple[int, int]:
    """(values, int32 words) per packing run: the smallest run that fills whole words."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    values = 32 // math.gcd(32, bits)
    return values, values * bits // 32


def pack_rows(v: Tensor, bits: int) -> Tensor:
    """Pack integer values [N, M] (in [0, 2^bits)) along dim 0 into int32 [N*bits/32, M]."""
    values, words = _run(bits)
    n, m = v.shape
    if n % values:
        raise ValueError(f"{n} rows cannot be packed at {bits} bits: need a multiple of {values}")
    v = v.to(torch.int64).reshape(n // values, values, m)
    if v.numel() and (v.min() < 0 or v.max() >= 2**bits):
        raise ValueError(f"values out of range for {bits} bits")
    out = torch.zeros(n // values, words, m, dtype=torch.int64, device=v.device)
    for k in range(values):
        w, off = divmod(k * bits, 32)
        out[:, w] |= (v[:, k] << off) & 0xFFFFFFFF
        if off + bits > 32:  # straddles into the next word (3 bit only)
            out[:, w + 1] |= v[:, k] >> (32 - off)
    out = out.reshape(-1, m)
    # uint32 bit patterns >= 2^31 become the negative int32 with the same bits.
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_rows(p: Tensor, bits: int) -> Tensor:
    """Inverse of pack_rows: int32 [N*bits/32, M] -> [N, M] (int32 for 2/4/8 bit, else int64)."""
    values, words = _run(bits)
    m = p.shape[1]
    mask = 2**bits - 1
    if words == 1:  # whole values per word: one broadcast shift; the mask drops the sign extension
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=p.device).view(1, -1, 1)
        return ((p.unsqueeze(1) >> shifts) & mask).reshape(-1, m)
    p = (p.to(torch.int64) & 0xFFFFFFFF).reshape(-1, words, m)
    out = []
    for k in range(values):
        w, off = divmod(k * bits, 32)
        x = p[:, w] >> off
        if off + bits > 32:  # straddles two words (3 bit)
            x = x | (p[:, w + 1] << (32 - off))
        out.append(x & mask)
    return torch.stack(out, 1).reshape(-1, m)


def pack_gptq_v1(
    result: QuantResult | Tensor,
    scales: Tensor | None = None,
    zeros: Tensor | None = None,
    g_idx: Tensor | None = None,
    bits: int = 4,
) -> dict[str, Tensor]:
    """QuantResult (or codes [out, in], scales/zeros [G, out], g_idx [in]) -> v1 tensors (no bias)."""
    if isinstance(result, QuantResult):
        codes, scales, zeros, g_idx, bits = result.codes, result.scales, result.zeros, result.g_idx, result.bits
    else:
        codes = result
        if scales is None or zeros is None or g_idx is None:
            raise ValueError("pack_gptq_v1 needs scales, zeros and g_idx along with codes")
    zeros = zeros.to(torch.int64)
    if zeros.numel() and (zeros.min() < 1 or zeros.max() > 2**bits):
        raise ValueError(f"v1 format stores zero-1 in {bits} bits: zero points must lie in [1, {2**bits}]")
    return {
        "qweight": pack_rows(codes.T, bits).contiguous(),
        "qzeros": pack_rows((zeros - 1).T, bits).T.contiguous(),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq_v1(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int = 4
) -> tuple[Tensor, Tensor, Tensor]:
    """v1 tensors -> (codes uint8 [out, in], zeros int32 [G, out] (= stored + 1), scales fp32 [G, out])."""
    codes = unpack_rows(qweight, bits).T.to(torch.uint8).contiguous()
    zeros = (unpack_rows(qzeros.T, bits).T + 1).to(torch.int32).contiguous()
    if codes.shape[1] != g_idx.shape[0] or zeros.shape != scales.shape:
        raise ValueError(
            f"inconsistent v1 tensors: qweight -> {tuple(codes.shape)}, qzeros -> {tuple(zeros.shape)}, "
            f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)}"
        )
    return codes, zeros, scales.float()


def dequantize_gptq_v1(
    qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int = 4, dtype: torch.dtype = torch.float32
) -> Tensor:
    """W [out, in] with W[o, i] = scales[g, o] * (q[i, o] - (z_stored[g, o] + 1)), g = g_idx[i]."""
    return dequantize_t(qweight, qzeros, scales, g_idx, bits, dtype).T.contiguous()


def dequantize_t(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor,
    bits: int = 4,
    dtype: torch.dtype = torch.float32,
    contiguous_groups: bool | None = None,
) -> Tensor:
    """W^T [in, out], the layout qweight unpacks to (no transpose copy). Computed in fp32, rounded once.

    contiguous_groups: whether g_idx == i // group_size (checked here when None; that costs a device sync)."""
    q = unpack_rows(qweight, bits)  # [in, out]
    zeros = unpack_rows(qzeros.T, bits).T + 1  # [G, out]
    scales = scales.float()
    n_in, n_out = q.shape
    n_groups = scales.shape[0]
    if contiguous_groups is None:
        contiguous_groups = n_in % n_groups == 0 and torch.equal(
            g_idx, _trivial_g_idx(n_in, n_in // n_groups, g_idx.device)
        )
    if contiguous_groups:
        # contiguous groups: broadcast per group instead of gathering a full [in, out] scale map
        q = q.view(n_groups, -1, n_out)
        w = (q - zeros.unsqueeze(1)).float().mul_(scales.unsqueeze(1))
    else:
        g = g_idx.long()
        w = (q - zeros[g]).float().mul_(scales[g])
    return w.reshape(n_in, n_out).to(dtype)


def _trivial_g_idx(n_in: int, group_size: int, device: torch.device) -> Tensor:
    return torch.arange(n_in, dtype=torch.int32, device=device) // group_size


def quantized_state_dict_entries(prefix: str, result: QuantResult, bias: Tensor | None = None) -> dict[str, Tensor]:
    """The five checkpoint tensors of one quantized module, keyed '{prefix}.qweight' etc."""
    packed = pack_gptq_v1(result)
    out_features = result.codes.shape[0]
    b = torch.zeros(out_features) if bias is None else bias.detach()
    packed["bias"] = b.to(device=result.codes.device, dtype=torch.float16).contiguous()
    return {f"{prefix}.{k}": packed[k] for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}


def _kernel_group(group_size: int) -> int | None:
    """Largest group size the int4 kernels accept that divides ours (scales are then repeated)."""
    return next((k for k in KERNEL_GROUP_SIZES if group_size % k == 0), None)


class QuantLinear(nn.Module):
    """Linear layer holding an AutoGPTQ v1 quantized weight; state dict keys match the checkpoint.

    Backends (the `backend` attribute):
      "dequant"   dequantize once to a cached float weight in the activation dtype, then F.linear.
                  Works everywhere; the reference for the others.
      "int4_cpu"  torch's aten._weight_int4pack_mm_for_cpu (4 bit only).
      "int4_cuda" torch's tinygemm aten._weight_int4pack_mm (4 bit, bf16 activations, sm80+).
      "triton"    qvlq.int4_triton's GEMV kernel (4 bit, CUDA, needs triton), tuned per shape at prepare().
      "mma"       qvlq.int4_mma's tensor-core GEMV (4 bit, CUDA sm80+, compiled at run time by NVRTC), tuned
                  per shape at prepare(); bf16 or fp16 activations (others are cast in and out).
      "fastest"   (a request, not a backend) on CUDA: time the usable CUDA kernels (CUDA_KERNELS) once per
                  distinct shape, use the fastest (see FASTEST). "auto" keeps int4_cuda on CUDA unless QVLQ_INT4_BACKEND
                  says otherwise.
    Both int4 kernels dequantize as (q - 8) * s + m per group, so m = s * (8 - zero). They need the
    groups contiguous; an act-order checkpoint (g_idx not i // group_size) is served by permuting the
    weight's input columns into group order once and gathering x[..., perm] at every call. Group
    sizes other than 32/64/128/256 use the largest of those dividing them, with repeated scales.
    From `dequant_rows` rows on (prefill), the int4 backends dequantize per call and run one dense GEMM
    (see DEQUANT_ROWS); set it to None to always use the kernel.

    Measured, 4096x4096, median per call (Xeon with AVX-512, 2 threads):
                      dequant    int4_cpu   nn.Linear
      fp32,  1 row     2.6 ms     32 ms      2.1 ms
      fp32, 512 rows   91 ms      15.7 s     105 ms
      bf16,  1 row     2.4 ms     0.9 ms     2.2 ms
      bf16, 512 rows   36 ms      307 ms*    48 ms     (* kernel only; dequant_rows=128 avoids it)
    So on CPU, 'auto' picks dequant (speed) and int4_cpu is the memory-saving choice for bf16/fp16
    decoding: its fp32 path is far too slow to use.

    Call prepare() after loading a state dict (it also runs lazily at the first forward, and again
    after .to() or load_state_dict()). If you change the buffers in place, call prepare() again.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        values, _ = _run(bits)
        gs = in_features if group_size == -1 else group_size
        if in_features % values or out_features % values:
            raise ValueError(f"in/out features must be multiples of {values} for {bits}-bit packing")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        n_groups = math.ceil(in_features / gs)
        i32 = torch.int32
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=i32, device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features * bits // 32, dtype=i32, device=device))
        self.register_buffer("scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device))
        # built on the CPU and moved: `//` on the meta device runs a slow Python decomposition (~10 ms a layer)
        self.register_buffer("g_idx", (torch.arange(in_features, dtype=i32) // gs).to(device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device))
        self.backend = "unprepared"
        self.dequant_rows: int | None = None  # int4 backends: from this many rows on, dequantize per call
        self._requested = "auto"
        self._cache: dict[str, Any] = {}
        self.register_load_state_dict_post_hook(lambda module, _keys: module._after_load())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, backend={self.backend}"
        )

    @classmethod
    def from_result(cls, result: QuantResult, bias: Tensor | None = None) -> QuantLinear:
        out_features, in_features = result.codes.shape
        m = cls(in_features, out_features, result.bits, result.group_size, device=result.codes.device)
        prefix = "x"
        sd = {k[len(prefix) + 1 :]: v for k, v in quantized_state_dict_entries(prefix, result, bias).items()}
        m.load_state_dict(sd)
        return m

    def _after_load(self) -> None:
        # load_state_dict(assign=True) adopts the incoming dtypes; the format says fp16. (Scales that
        # a caller already cast to bf16 have lost bits that this cannot restore: load them as fp16.)
        for n in ("scales", "bias"):
            if self._buffers[n].dtype != torch.float16:
                self._buffers[n] = self._buffers[n].to(torch.float16)
        self._invalidate()

    def _invalidate(self) -> None:
        self._cache = {}
        self.backend = "unprepared"

    def _apply(self, fn, recurse=True):
        # .to()/.cuda(): caches live on the old device. model.half()/.to(bf16) would also recast the
        # fp16 scales and bias (lossy for bf16): keep them fp16, following only the device move.
        self._invalidate()
        keep = {n: self._buffers[n] for n in ("scales", "bias")}
        super()._apply(fn, recurse)
        for n, old in keep.items():
            if self._buffers[n].dtype != torch.float16:
                self._buffers[n] = old.to(self._buffers[n].device)
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_gptq_v1(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, dtype)

    def _choose(self, backend: str) -> str:
        """The backend to build ('fastest' when both CUDA kernels can serve the layer and must be timed)."""
        on_cuda = self.qweight.device.type == "cuda"
        if backend == "auto" and on_cuda:
            env = env_backend()  # a model-wide preference: layers it cannot serve keep the default
            if env is not None and (env in ("fastest", "dequant") or self._int4_ok(env) is None):
                backend = env
        if backend == "fastest":
            if not on_cuda:
                return self._choose("auto")
            usable = [b for b in fastest_candidates() if self._int4_ok(b) is None]
            return "fastest" if len(usable) > 1 else (usable[0] if usable else "dequant")
        if backend != "auto":
            return backend
        # CPU: dequant by default. int4_cpu (opt-in) saves memory and is fast with bf16/fp16 activations,
        # but its fp32 path is far slower than a float GEMM on AVX2 machines (see the module docstring).
        if on_cuda and self._int4_ok("int4_cuda") is None:
            return "int4_cuda"
        return "dequant"

    def _int4_ok(self, backend: str) -> str | None:
        """None if the int4 kernel can serve this layer, else the reason it cannot."""
        if self.bits != 4:
            return "int4 kernels need bits=4"
        if backend in CUDA_KERNELS:
            if not torch.cuda.is_available() or self.qweight.device.type != "cuda":
                return f"{backend} needs the layer on a CUDA device"
            if torch.cuda.get_device_capability(self.qweight.device) < (8, 0):
                return f"{backend} needs compute capability 8.0+"
        if backend == "triton":
            return int4_triton.check_group_size(self.in_features, self.group_size) or int4_triton.triton_error()
        if backend == "mma":
            shape = int4_mma.check_shape(self.out_features, self.in_features, self.group_size)
            return shape or int4_mma.runtime_error()
        if _kernel_group(self.in_features if self.group_size == -1 else self.group_size) is None:
            return f"group_size {self.group_size} is not a multiple of 32"
        if backend == "int4_cpu":
            if self.out_features % 16:
                return "int4_cpu needs out_features % 16 == 0"
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                return "this torch has no _weight_int4pack_mm_for_cpu"
        elif self.out_features % 8 or self.in_features % 128:
            return "int4_cuda needs out_features % 8 == 0 and in_features % 128 == 0"
        return None

    @torch.no_grad()
    def prepare(self, backend: str = "auto", dtype: torch.dtype | None = None, lean: bool = False) -> QuantLinear:
        """One-time repacking for the chosen backend (one of BACKENDS: 'auto', 'fastest', 'dequant',
        'int4_cpu', 'int4_cuda', 'triton', 'mma').

        dtype: for 'dequant', build the float weight now in this dtype (else at the first call); for
        'triton', 'mma' and 'fastest', the activation dtype to tune and time with (default bf16).
        lean: int4 backends only: move the v1 buffers (qweight, qzeros, scales, g_idx) to host memory so the
        device holds one copy of the weight (the kernel's); every call, prefill included, then uses
        the kernel (triton, mma: many-row calls dequantize their copy per call; slower prefill, ~40% less
        weight memory). state_dict() still works."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self._requested = backend
        chosen = self._choose(backend)
        self._cache = {"device": self.bias.device}
        if self.bias.device.type != "meta":
            self._cache["bias_zero"] = not bool(self.bias.any())  # a host sync: here, never in a captured step
        if chosen == "dequant":
            if dtype is not None:
                self._cache["w"] = self.dequantize(dtype)
            self.backend = chosen
            return self
        reason = None if chosen == "fastest" else self._int4_ok(chosen)
        if reason is not None:
            raise ValueError(f"backend {chosen!r} cannot serve this layer: {reason}")
        codes, zeros, scales = unpack_gptq_v1(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        gs = self.in_features if self.group_size == -1 else self.group_size
        g_idx = self.g_idx.long()
        order = torch.argsort(g_idx, stable=True)
        arange = torch.arange(self.in_features, device=g_idx.device)
        if not torch.equal(g_idx[order], arange // gs):
            raise ValueError("g_idx does not split the input into equal groups of group_size")
        if not torch.equal(order, arange):  # act-order: put columns in group order, gather x to match
            codes = codes[:, order]
            self._cache["perm"] = order
        act_dtype = dtype or torch.bfloat16
        if chosen == "fastest":
            chosen = self._fastest(codes, zeros, scales, gs, act_dtype)
        if chosen == "triton":
            packed = int4_triton.pack(codes, zeros, scales, gs)
            self._cache["tpack"] = packed
            self._cache["tcfg"] = int4_triton.best_config(packed, act_dtype)
            int4_triton.counters(packed.qweight.device)  # allocated now, outside any graph capture
        elif chosen == "mma":
            mdtype = act_dtype if act_dtype in int4_mma.FORMATS else torch.bfloat16
            packed = int4_mma.pack(codes, zeros, scales, gs, mdtype)
            self._cache["mpack"] = packed
            self._cache["mcfg"] = int4_mma.best_config(packed)
            if not self._cache.get("bias_zero"):
                self._cache["bias_f32"] = self.bias.float()
        else:
            self._cache.update(_pack_torch_int4(chosen, codes, zeros, scales, gs))
        self.dequant_rows = DEQUANT_ROWS[chosen]
        if lean:
            for n in ("qweight", "qzeros", "g_idx", "scales"):
                self._buffers[n] = self._buffers[n].cpu()
            if chosen not in ("triton", "mma"):  # these dequantize their own copy for prefill
                self.dequant_rows = None
        self.backend = chosen
        return self

    def _fastest(self, codes: Tensor, zeros: Tensor, scales: Tensor, gs: int, dtype: torch.dtype) -> str:
        """Time every usable CUDA kernel (tuned) at one row, once per (out, in, group, dtype) in a process and
        once per machine and software (qvlq.tuning keeps the record)."""
        key = (self.out_features, self.in_features, gs, str(dtype).removeprefix("torch."))
        if key not in FASTEST:
            usable = [b for b in fastest_candidates() if self._int4_ok(b) is None]
            sources = digest(__file__, int4_mma.__file__, int4_triton.__file__)
            pdl = "mma" in usable and int4_mma.pdl_enabled(codes.device)  # QVLQ_PDL=0 times other configs
            FASTEST[key] = remember("int4 fastest", (*key, usable, pdl, sources), codes.device,
                                    lambda: self._time_kernels(key, usable, codes, zeros, scales, gs, dtype),
                                    dict, _fastest_record)  # fmt: skip
        return FASTEST[key]["choice"]

    def _time_kernels(
        self, key: tuple, usable: list[str], codes: Tensor, zeros: Tensor, scales: Tensor, gs: int, dtype: torch.dtype
    ) -> dict[str, Any]:
        """_fastest's measurement: each usable kernel timed (qvlq's own tuned first), the fastest named."""
        rec: dict[str, Any] = {
            "out_features": self.out_features, "in_features": self.in_features, "group_size": gs, "dtype": key[3],
        }  # fmt: skip
        if "int4_cuda" in usable:
            x = torch.randn(1, self.in_features, device=codes.device).to(dtype)
            rec["int4_cuda_us"] = time_tinygemm(x, _pack_torch_int4("int4_cuda", codes, zeros, scales, gs)) * 1e6
        mdtype = dtype if dtype in int4_mma.FORMATS else torch.bfloat16
        tuners = {  # qvlq's kernels, tuned per config
            "triton": lambda: int4_triton.tuned(int4_triton.pack(codes, zeros, scales, gs), dtype),
            "mma": lambda: int4_mma.tuned(int4_mma.pack(codes, zeros, scales, gs, mdtype)),
        }
        for name, tune in tuners.items():
            if name not in usable:
                continue
            try:
                res = tune()
                rec[f"{name}_us"], rec[f"{name}_config"] = res.seconds[res.best.name] * 1e6, res.best.name
                rec[f"{name}_configs_us"] = {c: s * 1e6 for c, s in res.seconds.items()}
            except RuntimeError as e:  # no config compiled and matched the reference: recorded, skipped
                rec[f"{name}_error"] = str(e)[:300]
        timed = {b: rec[f"{b}_us"] for b in CUDA_KERNELS if f"{b}_us" in rec}
        if not timed:
            raise RuntimeError(f"no int4 CUDA kernel could be timed for {key}: {rec}")
        rec["choice"] = min(timed, key=timed.__getitem__)
        return rec

    def _float_weight(self, dtype: torch.dtype) -> Tensor:
        w = self._cache.get("w")
        if w is None or w.dtype != dtype:  # keep one float copy only, in the latest dtype
            w = self._cache["w"] = self.dequantize(dtype)
        return w

    def _scales_zeros(self, dtype: torch.dtype) -> Tensor:
        key = f"sz_{dtype}"
        if key not in self._cache:
            self._cache[key] = self._cache["sz32"].to(dtype)
        return self._cache[key]

    def _bias(self, dtype: torch.dtype) -> Tensor | None:
        """The bias in ``dtype``, cast once; None when it is all zeros (the official Int4 stores a zero
        bias on every module without one: skipping it saves a cast and an add per call, which count
        when a decode step is a graph of small kernels)."""
        key = f"bias_{dtype}"
        if key not in self._cache:
            self._cache[key] = None if self._cache.get("bias_zero") else self.bias.to(dtype)
        return self._cache[key]

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "unprepared" or self._cache.get("device") != self.bias.device:
            self.prepare(self._requested)
        if self.backend == "dequant":
            return F.linear(x, self._float_weight(x.dtype), self._bias(x.dtype))
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.dequant_rows is not None and x2.shape[0] >= self.dequant_rows:
            # many rows (prefill): a transient float weight and one dense GEMM beat the int4 kernel
            if self.backend in ("triton", "mma"):  # from the kernel's copy (lean mode keeps no v1 buffers on device)
                kernel = int4_triton if self.backend == "triton" else int4_mma
                wt = kernel.dequantize(self._cache["tpack" if self.backend == "triton" else "mpack"], x.dtype)
                if "perm" in self._cache:
                    x2 = x2[:, self._cache["perm"]]
            else:
                wt = dequantize_t(
                    self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, x.dtype, "perm" not in self._cache
                )
            bias = self._bias(x.dtype)
            y = x2 @ wt if bias is None else torch.addmm(bias, x2, wt)
            return y.reshape(*lead, self.out_features)
        if "perm" in self._cache:
            x2 = x2[:, self._cache["perm"]]
        if self.backend == "triton":  # the stored bias, added in fp32 inside the kernel (not rounded to x's dtype)
            bias = None if self._cache.get("bias_zero") else self.bias
            y = int4_triton.gemv(x2, self._cache["tpack"], bias, self._cache["tcfg"])
            return y.reshape(*lead, self.out_features)
        if self.backend == "mma":  # bias added in fp32 inside the kernel; other activation dtypes cast in and out
            packed = self._cache["mpack"]
            y = int4_mma.gemv(x2.to(packed.dtype), packed, self._cache.get("bias_f32"), self._cache["mcfg"])
            return y.to(x.dtype).reshape(*lead, self.out_features)
        if self.backend == "int4_cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x2.contiguous(), self._cache["packed"], self._cache["group"], self._scales_zeros(x.dtype)
            )
        else:
            y = _tinygemm(x2, self._cache["packed"], self._scales_zeros(torch.bfloat16), self._cache["group"])
        bias = self._bias(y.dtype)
        return (y if bias is None else y + bias).reshape(*lead, self.out_features)


class FusedGemv(nn.Module):
    """Qwen's MLP gate, a(x) * silu(b(x)), of two mma-backed QuantLinears that read the same input (a decode
    step's mlp.w1 and mlp.w2) in one launch: the weight is stacked once (each layer's kernel copy becomes a
    view into it, so it is held once) and, where the config allows (`int4_mma.variant`), the kernel also
    computes the gate; else one GEMV gives both outputs and torch computes the gate. The layers' config: every
    output of `pair` is computed as the layers' own calls compute it (bit for bit), and the gate as torch's
    eager ops on them (bit for bit in the CPU model; on CUDA up to expf, checked when built). Built by
    `fuse_mma`; valid while neither layer is prepared again (a layer prepared again gets its own copy back;
    this one keeps computing with the weights it was built from)."""

    def __init__(
        self, packed: int4_mma.Packed, bias: Tensor | None, cfg: int4_mma.Config, split: int,
        glu: int4_mma.Config | None, glu_error: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("qweight", packed.qweight, persistent=False)
        self.register_buffer("meta", packed.meta, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.group_size, self.act_dtype, self.cfg, self.split = packed.group_size, packed.dtype, cfg, split
        self.glu, self.glu_error = glu, glu_error  # why glu is None

    @property
    def packed(self) -> int4_mma.Packed:
        """The stacked weight (its buffers follow the module's device)."""
        return int4_mma.Packed(self.qweight, self.meta, self.group_size, self.act_dtype)

    def _gemv(self, x: Tensor, cfg: int4_mma.Config) -> Tensor:
        y = int4_mma.gemv(x.reshape(-1, x.shape[-1]).to(self.act_dtype), self.packed, self.bias, cfg).to(x.dtype)
        return y.reshape(*x.shape[:-1], -1)

    def pair(self, x: Tensor, cfg: int4_mma.Config | None = None) -> tuple[Tensor, Tensor]:
        """(a(x), b(x)) from one launch, with the layers' config or `cfg`."""
        y = self._gemv(x, cfg or self.cfg)
        return y[..., : self.split], y[..., self.split :]

    def forward(self, x: Tensor) -> Tensor:
        """The gate in x's dtype: in the kernel when x has the kernel's activation dtype (else the model's ops
        would not round a and b to it)."""
        if self.glu is not None and x.dtype == self.act_dtype:
            return self._gemv(x, self.glu)
        return int4_mma.swiglu(*self.pair(x))

    @torch.no_grad()
    def check_glu(self, seed: int = 0) -> str | None:
        """On CUDA: the glu kernel against torch's gate on the pair at one random row; on a mismatch (or an
        error) the gate goes back to torch and the reason is kept in glu_error. None if it holds."""
        if self.glu is None or self.qweight.device.type != "cuda":
            return self.glu_error
        gen = torch.Generator(device=self.qweight.device).manual_seed(seed)
        x = torch.randn(1, self.qweight.shape[1] * int4_mma.CHUNK, device=self.qweight.device, generator=gen)
        x = x.to(self.act_dtype)
        # against torch's gate on the pair of the glu block's own plain config: its halves sum each output in that
        # config's order, bit for bit. The layers' config (which the tuner's pick need not share) sums in another
        # order, and a rounding of a or b that flips there is 1-2 units off after the gate: on an H100 that failed
        # 3 of 32 full-size layers, with relative errors of 1e-5 to 1.5e-4 (2026-11-27)
        plain = self.glu._replace(glu=0, pdl=0)
        try:
            bad = int4_triton.mismatch(self(x), int4_mma.swiglu(*self.pair(x, plain)).float())
        except RuntimeError as e:
            bad = int4_triton.error_line(e)
        if bad is not None:
            self.glu, self.glu_error = None, f"glu kernel off: {bad}"
        return self.glu_error


def fused_config(
    first: int4_mma.Config, p: int4_mma.Packed, bias: Tensor | None, flags: dict[str, int], ranked_by: int4_mma.Packed
) -> int4_mma.Config | str:  # fmt: skip
    """The config of a fused launch on p with `flags` (glu / norm / resid), where first is the layer's plain
    config: on CUDA the fastest variant of first and the next fastest plain configs of ranked_by's shape that
    checks out (`int4_mma.tuned_variant`); elsewhere first's variant. A str says why there is none."""
    if p.qweight.device.type == "cuda":
        try:
            return int4_mma.tuned_variant(p, bias, flags, first, ranked_by).best
        except RuntimeError as e:
            return f"no {int4_mma.flags_name(flags)} launch: {int4_triton.error_line(e)}"
    v = int4_mma.variant(first, p.group_size, **flags)
    return v or f"config {first.name}: its {int4_mma.flags_name(flags)} block exceeds the threads or shared memory"


def fuse_mma(a: nn.Module, b: nn.Module) -> FusedGemv | None:
    """`FusedGemv` for a(x) * silu(b(x)) when both layers run the mma kernel with one config and shape, group
    size and activation dtype, without act-order gathers; else None (the caller keeps the two calls).
    Fusing the same pair again returns the same module (a second engine on the model shares it)."""
    if not (isinstance(a, QuantLinear) and isinstance(b, QuantLinear) and a.backend == b.backend == "mma"):
        return None
    ca, cb = a._cache, b._cache
    if ca.get("fused") is not None and ca.get("fused") is cb.get("fused"):
        return ca["fused"]
    pa, pb = ca["mpack"], cb["mpack"]
    key = (pa.out_features, pa.in_features, pa.group_size, pa.dtype, ca["mcfg"])
    if key != (pb.out_features, pb.in_features, pb.group_size, pb.dtype, cb["mcfg"]) or "perm" in ca or "perm" in cb:
        return None
    qweight, meta = torch.cat([pa.qweight, pb.qweight]), torch.cat([pa.meta, pb.meta])
    t = pa.qweight.shape[0]  # tiles of a: the views keep 16-byte alignment (a tile is 512 bytes a chunk)
    ca["mpack"] = pa._replace(qweight=qweight[:t], meta=meta[:t])
    cb["mpack"] = pb._replace(qweight=qweight[t:], meta=meta[t:])
    bias = None
    if "bias_f32" in ca or "bias_f32" in cb:
        bias = torch.cat([ca.get("bias_f32", a.bias.new_zeros(a.out_features, dtype=torch.float32)),
                          cb.get("bias_f32", b.bias.new_zeros(b.out_features, dtype=torch.float32))])  # fmt: skip
    packed = int4_mma.Packed(qweight, meta, pa.group_size, pa.dtype)
    glu = fused_config(ca["mcfg"], packed, bias, {"glu": 1}, pa)
    why = glu if isinstance(glu, str) else None
    fused = FusedGemv(packed, bias, ca["mcfg"], a.out_features, None if why else glu, why)
    fused.check_glu()
    ca["fused"] = cb["fused"] = fused
    return fused


class FusedBlock(nn.Module):
    """A Qwen block's decode step in four mma launches: the RMSNorms go into the prologue of the GEMV that
    reads them (ln_1 -> attn.c_attn, ln_2 -> mlp.w1 + w2 with the gate) and the residual adds into the epilogue
    of attn.c_proj and mlp.c_proj, so no other kernel touches the residual stream (the unfused step has two
    more a layer, add + RMSNorm). Outputs: as the model's ops, up to the order of the RMSNorm's fp32 sum and
    rsqrt's rounding (bit for bit in the CPU model); checked against them when built on CUDA (`check`).
    Built by `fuse_block`; it holds the layers' kernel copies, so it is valid until one is prepared again."""

    def __init__(self, block: nn.Module, mlp: FusedGemv, cfgs: dict[str, int4_mma.Config]) -> None:
        super().__init__()
        self.block = [block]  # not a submodule: the model owns it
        self.mlp = mlp
        self.cfgs = cfgs
        self.eps = (float(block.ln_1.eps), float(block.ln_2.eps))
        self.error: str | None = None

    def _run(self, name: str, lin: nn.Module | None, x: Tensor, gamma: Tensor | None, eps: float,
             resid: Tensor | None) -> Tensor:  # fmt: skip
        if lin is None:  # the MLP's stacked w1 + w2
            packed, bias = self.mlp.packed, self.mlp.bias
        else:
            packed, bias = lin._cache["mpack"], lin._cache.get("bias_f32")
        r = None if resid is None else resid.reshape(-1, resid.shape[-1])
        y = int4_mma.gemv(x.reshape(-1, x.shape[-1]), packed, bias, self.cfgs[name], gamma, eps, r)
        return y.reshape(*x.shape[:-1], -1)

    def attn_in(self, x: Tensor) -> Tensor:
        """attn.c_attn(ln_1(x)): q, k, v."""
        b = self.block[0]
        return self._run("attn_in", b.attn.c_attn, x, b.ln_1.weight, self.eps[0], None)

    def attn_out(self, o: Tensor, x: Tensor) -> Tensor:
        """x + attn.c_proj(o): the residual stream after attention."""
        return self._run("attn_out", self.block[0].attn.c_proj, o, None, 0.0, x)

    def mlp_step(self, x: Tensor) -> Tensor:
        """x + mlp(ln_2(x)): the residual stream after the MLP."""
        b = self.block[0]
        gate = self._run("mlp_in", None, x, b.ln_2.weight, self.eps[1], None)
        return self._run("mlp_out", b.mlp.c_proj, gate, None, 0.0, x)

    @torch.no_grad()
    def check(self, seed: int = 0) -> str | None:
        """On CUDA: the four launches against the model's ops at one random row; None if they agree (relative
        error under int4_mma.FUSED_TOL: a wrong kernel is off by O(1)), else why, also kept in `error`."""
        b = self.block[0]
        dev, dtype = b.ln_1.weight.device, b.ln_1.weight.dtype
        gen = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(1, 1, b.ln_1.weight.numel(), device=dev, generator=gen).to(dtype)
        o = torch.randn(1, 1, b.attn.c_proj.in_features, device=dev, generator=gen).to(dtype)
        pairs = [
            ("attn_in", self.attn_in(x), b.attn.c_attn(b.ln_1(x))),
            ("attn_out", self.attn_out(o, x), x + b.attn.c_proj(o)),
            ("mlp", self.mlp_step(x), x + b.mlp.c_proj(self.mlp(b.ln_2(x)))),
        ]
        errors = {n: int4_triton.rel_error(y, want) for n, y, want in pairs}
        bad = [f"{n} {e:.2e}" for n, e in errors.items() if not e < int4_mma.FUSED_TOL]
        self.error = f"fused block off: relative error {', '.join(bad)}" if bad else None
        return self.error


def fuse_block(block: nn.Module, mlp: FusedGemv | None, dtype: torch.dtype) -> FusedBlock | str:
    """`FusedBlock` for a Qwen block whose four int4 linears run the mma kernel for activations of ``dtype``
    (the model's: the norm prologue rounds as the model does only in its own dtype) and whose MLP is fused
    with its gate in the kernel (`fuse_mma`), where each launch's block fits; else why not."""
    attn = block.attn
    lins = {"attn_in": attn.c_attn, "attn_out": attn.c_proj, "mlp_out": block.mlp.c_proj}
    if mlp is None or mlp.glu is None:
        return "mlp.w1 and w2 are not fused with their gate in the mma kernel"
    for name, lin in lins.items():
        if not (isinstance(lin, QuantLinear) and lin.backend == "mma") or "perm" in lin._cache:
            return f"{name}: not an mma layer without act-order"
        if lin._cache["mpack"].dtype != dtype:
            return f"{name}: packed for {lin._cache['mpack'].dtype}, the model runs {dtype}"
    if mlp.act_dtype != dtype or any(ln.weight.dtype != dtype for ln in (block.ln_1, block.ln_2)):
        return f"the MLP or the norms are not in {dtype}"
    hidden = block.ln_1.weight.numel()
    w1 = block.mlp.w1._cache["mpack"]  # the stacked weight's plain config is w1's (fuse_mma)
    wanted = {name: (lin._cache["mcfg"], lin._cache["mpack"], lin._cache.get("bias_f32"), lin._cache["mpack"])
              for name, lin in lins.items()}  # fmt: skip
    wanted["mlp_in"] = (mlp.cfg, mlp.packed, mlp.bias, w1)
    flags = {"attn_in": {"norm": hidden}, "attn_out": {"resid": 1}, "mlp_in": {"glu": 1, "norm": hidden},
             "mlp_out": {"resid": 1}}  # fmt: skip
    cfgs = {}
    for name, (first, packed, bias, ranked_by) in wanted.items():
        v = fused_config(first, packed, bias, flags[name], ranked_by)
        if isinstance(v, str):
            return f"{name}: {v}"
        cfgs[name] = v
    fb = FusedBlock(block, mlp, cfgs)
    if block.ln_1.weight.device.type == "cuda" and fb.check() is not None:
        return fb.error
    return fb


def _tinygemm(x2: Tensor, packed: Tensor, sz_bf16: Tensor, group: int) -> Tensor:
    """tinygemm computes in bf16: other activation dtypes are cast in and out."""
    xb = x2.to(torch.bfloat16).contiguous()
    return torch.ops.aten._weight_int4pack_mm(xb, packed, group, sz_bf16).to(x2.dtype)


def time_tinygemm(x: Tensor, tiny: dict[str, Any], calls: int = 200, repeats: int = 5) -> float:
    """Seconds per tinygemm call on x, timed as int4_triton.tune times the Triton kernel (a CUDA graph of
    many calls, weight copies rotated past L2). tiny: _pack_torch_int4("int4_cuda", ...)."""
    w, sz = tiny["packed"], tiny[f"sz_{torch.bfloat16}"]
    n = int4_triton.copies_for_l2(w.numel() * w.element_size() + sz.numel() * sz.element_size(), x.device)
    ws = [(w.clone(), sz.clone()) for _ in range(n)]
    return int4_triton.time_graph(lambda i: _tinygemm(x, *ws[i % n], tiny["group"]), calls, repeats)


def _pack_torch_int4(backend: str, codes: Tensor, zeros: Tensor, scales: Tensor, gs: int) -> dict[str, Any]:
    """Cache entries of torch's int4 kernels (int4_cpu / int4_cuda) for group-ordered codes [out, in]."""
    kg = _kernel_group(gs)
    rep = gs // kg
    # tinygemm convention: w = (q - 8) * s + m  ==  s * (q - zero)  with  m = s * (8 - zero)
    s = scales.repeat_interleave(rep, 0)
    m = s * (8 - zeros.float()).repeat_interleave(rep, 0)
    sz = torch.stack([s, m], -1).contiguous()
    out: dict[str, Any] = {"group": kg}
    if backend == "int4_cuda":  # tinygemm takes bf16 only: keep no fp32 copy (~0.4 GB at full size)
        out[f"sz_{torch.bfloat16}"] = sz.to(torch.bfloat16)
        c = codes.to(torch.int32)
        u8 = ((c[:, ::2] << 4) | c[:, 1::2]).to(torch.uint8)  # even k in the high nibble
        out["packed"] = torch.ops.aten._convert_weight_to_int4pack(u8.contiguous(), 8)
    else:
        out["sz32"] = sz
        out["packed"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    return out


def int4_backends(model: nn.Module) -> dict[str, int]:
    """How many QuantLinear layers of ``model`` each backend serves (for reports)."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            out[m.backend] = out.get(m.backend, 0) + 1
    return out
