"""A gpt-fast-style decode engine for Qwen-VL: static KV cache, precomputed RoPE tables and one
decode step with static shapes, so the step can be compiled and captured as a CUDA graph.

Batch-1 decoding is bound by memory bandwidth: every step must read all weights (14.2 GB BF16) plus the
KV cache once. The eager HF loop never gets there because each step is ~1000 small kernel launches
from Python and a DynamicCache that re-concatenates the whole cache per token. Here:

  prefill  the model's own forward (image spans, image encoder, NTK, logN, SDPA causal) writing into
           the static cache through a duck-typed `Cache`; lm_head only for the last position. Eager.
  step     `Decoder.forward(tokens [B, 1], pos [1], kv_len)`: embed, 32 blocks (the model's own
           modules: RMSNorms, c_attn/c_proj/MLP linears, float or QuantLinear; a block whose int4 linears
           all run the mma kernel goes as four launches with its norms, gate and residual adds inside,
           see fuse_block), ln_f, lm_head. Only
           tensor ops on static shapes: no .item(), no branches on tensor values. Compiled with
           torch.compile(mode="reduce-overhead", fullgraph=True) on CUDA (inductor's CUDA graphs), or
           captured by hand with torch.cuda.CUDAGraph when compile is off.

Semantics (see the spec, §3): NTK alpha is chosen at prefill from the prompt length and kept while
decoding (cos/sin tables for all max_seq_len positions, fp32, rebuilt in place only when alpha
changes); the query at position p is scaled by log(p+1)/log(seq_length) once p+1 > seq_length, the
factor computed from the position tensor inside the step and cast to the query dtype; keys are never
scaled. Attention: "sdpa"/"math" run over the whole cache (or the first kv_block-multiple of slots) with
the mask k_index <= pos, so slots not yet written, or left over from an earlier longer sequence, get weight
0; "triton" (qvlq.decode_attention) does RoPE, logN, the cache write and attention in one kernel a layer,
reading the position on the device and only slots 0..pos (one graph for every length); "fastest" times SDPA
against it at engine build and keeps the faster (CUDA).

Batch > 1 works for prompts of equal length (no padding support): every row shares one position.
`make_engine(name, model, max_seq_len)` is the registry ("hf", "fast") the profiler calls.
"""

from __future__ import annotations

import functools
import math
import time
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_attention as DA
from .generate import HFEngine
from .model.modeling import apply_rope, ntk_alpha, rope_cos_sin

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
ATTENTIONS = ("sdpa", "math", "triton", "fastest")
FUSE_LEVELS = ("block", "mlp", "off")  # int4 fusion: fuse_block (+ fuse_mlp), fuse_mlp only, neither


def fuse_options(level: str) -> dict[str, bool]:
    """FastEngine's fuse_mlp / fuse_block for a FUSE_LEVELS name (`qvlq profile --fuse`)."""
    if level not in FUSE_LEVELS:
        raise ValueError(f"fuse must be one of {', '.join(FUSE_LEVELS)}, got {level!r}")
    return {"fuse_mlp": level != "off", "fuse_block": level == "block"}


class KVCache(nn.Module):
    """One layer's static cache, [B, H, max_seq_len, D] each for keys and values."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, H, S, D] go to slots pos [S]."""
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)


class PrefillCache:
    """Just enough of transformers' Cache for QWenModel.forward at prefill: the model's attention
    hands us each layer's rotated k, v; we store them at slots 0..S-1 and give back views of them."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # always a fresh prompt: the model then picks NTK alpha from its length

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        kv = self.layers[layer_idx]
        s = k.shape[2]
        kv.k[:, :, :s].copy_(k)
        kv.v[:, :, :s].copy_(v)
        return kv.k[:, :, :s], kv.v[:, :, :s]


@torch.library.custom_op("qvlq::logn_scale", mutates_args=())
def logn_scale(pos: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    """Qwen's logN query scale at positions pos [S]: log(p + 1) / log(seq_length) past seq_length, else 1."""
    p1 = (pos + 1).to(torch.float64)
    scale = torch.where(p1 > seq_length, p1.log() / math.log(seq_length), torch.ones_like(p1))
    return scale.to(torch.float32).to(dtype)[:, None]


@logn_scale.register_fake
def _(pos: torch.Tensor, seq_length: int, dtype: torch.dtype) -> torch.Tensor:
    return pos.new_empty((pos.shape[0], 1), dtype=dtype)


class Decoder(nn.Module):
    """The unit that gets compiled / captured: one decode step over the static cache."""

    def __init__(
        self, model: nn.Module, max_seq_len: int, batch_size: int, attention: str = "sdpa",
        attention_config: DA.Config = DA.DEFAULT_CONFIG, fuse_mlp: bool = True, fuse_block: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        from .int4 import fuse_block as fuse_block_
        from .int4 import fuse_mma

        cfg = model.config
        wte = model.transformer.wte.weight
        self.model = model
        self.attention = attention
        self.attention_config = attention_config
        self.seq_length = int(cfg.seq_length)
        self.use_logn = bool(cfg.use_logn_attn)
        self.rotary_dim = int(model.transformer.rotary_dim)
        self.rotary_base = float(cfg.rotary_emb_base)
        attn = model.transformer.h[0].attn
        self.kv = nn.ModuleList(
            KVCache(batch_size, attn.num_heads, max_seq_len, attn.head_dim, wte.dtype, wte.device)
            for _ in model.transformer.h
        )
        # mlp.w1 and mlp.w2 read the same input: one int4 GEMV where both run the mma kernel, with the gate
        # w1 * silu(w2) in its epilogue (two launches a layer fewer, the weight read in one stream), at the
        # batch sizes where their own calls use the kernel
        fused = {}
        for i, block in enumerate(model.transformer.h):
            rows = getattr(block.mlp.w1, "dequant_rows", None)
            if fuse_mlp and (rows is None or batch_size < rows):
                f = fuse_mma(block.mlp.w1, block.mlp.w2)
                if f is not None:
                    fused[str(i)] = f
        self.fused_mlp = nn.ModuleDict(fused)
        # then the whole block: its RMSNorms and residual adds inside the mma launches (fuse_block)
        blocks, self.fused_block_off = {}, set()
        for i, block in enumerate(model.transformer.h):
            if fuse_block and str(i) in fused:
                fb = fuse_block_(block, fused[str(i)], wte.dtype)
                if isinstance(fb, str):
                    self.fused_block_off.add(fb)
                else:
                    blocks[str(i)] = fb
        self.fused_blocks = nn.ModuleDict(blocks)
        self.register_buffer("cos", torch.zeros(max_seq_len, self.rotary_dim, device=wte.device), persistent=False)
        self.register_buffer("sin", torch.zeros(max_seq_len, self.rotary_dim, device=wte.device), persistent=False)
        # CUDA graphs replay fixed addresses. Dynamo already treats module buffers as static inputs of
        # inductor's cudagraphs (not copied per replay); say it explicitly for the ones we mutate.
        for t in (self.cos, self.sin, *(b for kv in self.kv for b in (kv.k, kv.v))):
            torch._dynamo.mark_static_address(t, guard=False)

    @torch.no_grad()
    def set_rope(self, alpha: float) -> None:
        """Rebuild the fp32 cos/sin tables in place (same storage, so captured graphs stay valid)."""
        positions = torch.arange(self.cos.shape[0], device=self.cos.device)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, self.rotary_base, alpha)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def logn(self, pos: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[S, 1] query scale, computed as the reference computes it (float64 as Python does, then fp32), in
        dtype. One opaque op a step: traced as plain ops, inductor recomputed it in a kernel per layer."""
        return torch.ops.qvlq.logn_scale(pos, self.seq_length, dtype)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """q [B, H, 1, D] over k, v [B, H, kv_len, D]; bias [1, 1, 1, kv_len] is 0 or -inf."""
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        # "math": two batched GEMVs and an fp32 softmax; lets inductor pick the kernels.
        scores = (q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5)
        return (scores + bias).softmax(-1).to(v.dtype) @ v

    def layer_sdpa(
        self, attn: nn.Module, qkv: torch.Tensor, kv: KVCache, pos: torch.Tensor, kv_len: int, cos: torch.Tensor,
        sin: torch.Tensor, logn: torch.Tensor | None, bias: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """One layer's attention ("sdpa"/"math") of its c_attn output qkv [B, 1, 3*H*D] -> [B, 1, H*D]."""
        b = qkv.shape[0]
        q, k, v = qkv.split(attn.num_heads * attn.head_dim, dim=-1)
        q = q.view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        v = v.view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if logn is not None:
            q = q * logn.to(q.dtype)  # the reference casts the factor to the query dtype first
        kv.write(pos, k, v)
        out = self.attend(q, kv.k[:, :, :kv_len], kv.v[:, :, :kv_len], bias)
        return out.transpose(1, 2).reshape(b, 1, -1)

    def layer_triton(
        self, attn: nn.Module, qkv: torch.Tensor, kv: KVCache, pos: torch.Tensor, logn: torch.Tensor | None
    ) -> torch.Tensor:
        """The same with qvlq.decode_attention: RoPE, logN, cache write and attention in one kernel."""
        b = qkv.shape[0]
        qkv = qkv.view(b, 3, attn.num_heads, attn.head_dim)
        out = DA.decode_attention(qkv, kv.k, kv.v, self.cos, self.sin, pos, logn, self.attention_config)
        return out.reshape(b, 1, -1)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """tokens [B, 1] at position pos [1] -> logits [B, V]; attends over cache slots [0, kv_len)."""
        t = self.model.transformer
        x = t.wte(tokens)
        if self.attention == "triton":  # the reference casts the factor to the query dtype first
            logn_q = self.logn(pos, x.dtype) if self.use_logn else None
            layer = functools.partial(self.layer_triton, pos=pos, logn=logn_q)
        else:  # per-step tensors, not per layer: the RoPE rows and the causal mask as an additive bias
            logn = self.logn(pos) if self.use_logn else None
            cos, sin = self.cos.index_select(0, pos), self.sin.index_select(0, pos)  # [1, D] fp32
            allowed = (torch.arange(kv_len, device=pos.device) <= pos).view(1, 1, 1, kv_len)
            bias_dtype = x.dtype if self.attention == "sdpa" else torch.float32
            bias = torch.zeros(allowed.shape, dtype=bias_dtype, device=pos.device).masked_fill(~allowed, float("-inf"))
            layer = functools.partial(
                self.layer_sdpa, pos=pos, kv_len=kv_len, cos=cos, sin=sin, logn=logn, bias=bias
            )
        for i, (block, kv) in enumerate(zip(t.h, self.kv, strict=True)):
            if str(i) in self.fused_blocks:  # the block in four int4 launches (norms and residual adds inside)
                fb = self.fused_blocks[str(i)]
                x = fb.mlp_step(fb.attn_out(layer(block.attn, fb.attn_in(x), kv), x))
                continue
            x = x + block.attn.c_proj(layer(block.attn, block.attn.c_attn(block.ln_1(x)), kv))
            h = block.ln_2(x)
            if str(i) in self.fused_mlp:  # QWenMLP.forward with w1, w2 (and the gate) in one launch
                x = x + block.mlp.c_proj(self.fused_mlp[str(i)](h))
            else:
                x = x + block.mlp(h)
        return self.model.lm_head(t.ln_f(x[:, -1]))


class FastEngine:
    """Static-cache decode engine; same interface as generate.HFEngine.

    compile: "auto" = torch.compile(mode="reduce-overhead", fullgraph=True) on CUDA (inductor CUDA
      graphs; "default" mode when cuda_graphs=False), eager on CPU. True = compile on any device
      (CPU: inductor "default"). A string = that torch.compile mode. False = eager.
    cuda_graphs: with compile off on CUDA, capture the eager step in a torch.cuda.CUDAGraph instead
      (no compile time; unfused kernels).
    kv_block: None attends over all max_seq_len slots every step (one graph). An int B attends over
      the first ceil((pos+1)/B)*B slots: less KV read early in long runs, one graph per bucket (with
      compile, the length becomes dynamic after the second bucket: one recompile). Not with "triton".
    attention: "sdpa" (F.scaled_dot_product_attention with an additive 0/-inf mask), "math" (matmul,
      fp32 softmax, matmul; scores rounded to the compute dtype as in the reference's eager path),
      "triton" (qvlq.decode_attention: RoPE, logN, cache write and attention over slots 0..pos in one
      kernel a layer, config tuned on CUDA) or "fastest" (CUDA: both
      timed on this cache geometry at its middle position, the faster kept, see `attention_choice`;
      elsewhere "sdpa").
    compile_backend: torch.compile backend; "aot_eager" traces the same graph without codegen (tests).
    fuse_mlp: run each layer's mlp.w1 and mlp.w2 as one int4 GEMV where both use the mma kernel, with the
      gate w1 * silu(w2) in the kernel's epilogue (`qvlq.int4.fuse_mma`: w1 and w2 bit for bit as their own
      calls, the gate as torch's ops on them; two launches fewer a layer).
    fuse_block: with fuse_mlp, run each block whose four int4 linears use the mma kernel in the model's dtype as
      four launches (`qvlq.int4.fuse_block`): ln_1 and ln_2 in the prologue of c_attn and of the MLP's GEMV,
      the residual adds in the epilogue of the two c_proj (two launches fewer a layer; RMSNorm's fp32 sum in
      another order). Checked against the model's ops when built on CUDA; `describe()` says where it is off.
    """

    name = "fast"

    def __init__(
        self,
        model: nn.Module,
        max_seq_len: int,
        batch_size: int = 1,
        compile: bool | str = "auto",
        cuda_graphs: bool = True,
        kv_block: int | None = None,
        attention: str = "sdpa",
        compile_backend: str = "inductor",
        fuse_mlp: bool = True,
        fuse_block: bool = True,
    ) -> None:
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if kv_block is not None and kv_block < 1:
            raise ValueError("kv_block must be a positive number of slots")
        if kv_block is not None and attention in ("triton", "fastest"):
            raise ValueError(f"kv_block buckets the SDPA length; attention {attention!r} reads slots 0..pos itself")
        self.model = model
        self.max_seq_len = int(max_seq_len)
        self.batch_size = int(batch_size)
        self.kv_block = kv_block
        wte = model.transformer.wte.weight
        self.device, self.dtype = wte.device, wte.dtype
        on_cuda = self.device.type == "cuda"

        if compile == "auto":
            mode = ("reduce-overhead" if cuda_graphs else "default") if on_cuda else None
        elif compile is True:
            mode = "reduce-overhead" if on_cuda and cuda_graphs else "default"
        elif compile is False or compile is None:
            mode = None
        elif compile in COMPILE_MODES:
            mode = compile
        else:
            raise ValueError(f"compile must be 'auto', a bool or one of {COMPILE_MODES}, got {compile!r}")
        self.compile_mode, self.compile_backend = mode, compile_backend
        if mode is None:
            self.graphs = "manual" if on_cuda and cuda_graphs else None
        else:  # modes are inductor options; the ones below capture CUDA graphs (cudagraph trees)
            captures = compile_backend == "inductor" and mode in ("reduce-overhead", "max-autotune")
            self.graphs = "inductor" if on_cuda and captures else None

        attention, attn_cfg, self.attention_choice = self._choose_attention(model, attention)
        with torch.inference_mode(False):  # normal tensors: writable in and out of inference mode
            self.decoder = Decoder(
                model, self.max_seq_len, self.batch_size, attention, attn_cfg, fuse_mlp, fuse_mlp and fuse_block
            )
            self._pos = torch.zeros(1, dtype=torch.long, device=self.device)  # device copy of self._len
            self._tok = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.device)  # graph input
        self._step_fn = self.decoder
        if mode is not None:
            options = {"mode": mode} if compile_backend == "inductor" else {}
            self._step_fn = torch.compile(self.decoder, backend=compile_backend, fullgraph=True, **options)
        self._alpha: float | None = None
        self._len: int | None = None  # tokens in the cache; None before prefill
        # manual CUDA graphs: one (graph, logits) per kv_len bucket, fed through _tok and _pos
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.first_step_s: float | None = None  # first call: compile and/or capture included

    # ------------------------------------------------------------ interface
    def reset(self) -> None:
        """Forget the sequence; cache contents are left in place (the mask hides stale slots)."""
        self._len = None

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        images: Any = None,
        image_features: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
    ) -> torch.Tensor:
        """Run the prompt [B, S] through the model into the static cache; logits [B, V] of the last
        position. If max_new_tokens is given, S + max_new_tokens <= max_seq_len is checked before any
        work; step() itself refuses only a position past the cache."""
        b, s = input_ids.shape
        if b != self.batch_size:
            raise ValueError(f"engine built for batch {self.batch_size}, got {b} prompts")
        if s < 1 or s + (max_new_tokens or 0) > self.max_seq_len:
            raise ValueError(
                f"prompt of {s} tokens + {max_new_tokens or 0} new tokens exceeds max_seq_len={self.max_seq_len}"
            )
        cfg = self.model.config
        alpha = ntk_alpha(s, cfg.seq_length) if cfg.use_dynamic_ntk else 1.0
        if alpha != self._alpha:
            self.decoder.set_rope(alpha)
            self._alpha = alpha
        cache = PrefillCache(self.decoder.kv)
        out = self.model(
            input_ids.to(self.device), images=images, image_features=image_features, cache=cache, use_cache=True,
            logits_to_keep=1,
        )
        model_alpha = getattr(cache, "qvlq_ntk_alpha", alpha)
        if model_alpha != alpha:  # the model's own rule disagrees with ours (training mode?)
            raise RuntimeError(f"prefill used NTK alpha {model_alpha}, decode tables were built for {alpha}")
        self._len = s
        return out.logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B] (the last sampled ones) -> logits [B, V] for the next position."""
        if self._len is None:
            raise RuntimeError("call prefill() before step()")
        if self._len >= self.max_seq_len:
            raise ValueError(f"sequence would exceed max_seq_len={self.max_seq_len}: build the engine with more")
        tokens = tokens.reshape(self.batch_size, 1).to(self.device, torch.long)
        kv_len = self._kv_len(self._len)
        self._pos.fill_(self._len)  # a fill kernel, not a host->device copy: no sync
        t0 = time.perf_counter() if self.first_step_s is None else None
        if self.graphs == "manual":
            logits = self._replay(tokens, kv_len)
        else:
            if self.graphs == "inductor":
                torch.compiler.cudagraph_mark_step_begin()  # last step's outputs may be overwritten
            logits = self._step_fn(tokens, self._pos, kv_len).clone()  # clone: graph outputs are reused
        if t0 is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_step_s = time.perf_counter() - t0
        self._len += 1
        return logits

    def describe(self) -> dict[str, Any]:
        """What this engine runs, for the profile report."""
        int4 = next((m for m in self.model.modules() if type(m).__name__ == "QuantLinear"), None)
        fused = list(self.decoder.fused_mlp.values())
        info: dict[str, Any] = {
            "engine": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "compile": self._compile_desc(),
            "cuda_graphs": self.graphs,
            "attention": (
                f"triton split-KV over slots 0..pos, {self.decoder.attention_config.name}"
                if self.decoder.attention == "triton"
                else f"{self.decoder.attention} over the static cache, mask k_index <= pos"
            ),
            "attention_choice": self.attention_choice,
            "kv_block": self.kv_block,
            "kv_cache_bytes": sum(b.numel() * b.element_size() for b in self.decoder.kv.buffers()),
            "int4_backend": getattr(int4, "backend", None),
            "fused_mlp": len(self.decoder.fused_mlp),  # layers whose mlp.w1 and w2 run as one int4 GEMV
            # ... with the gate w1 * silu(w2) in the kernel too (it needs the model in the kernel's dtype)
            "fused_mlp_gate": sum(f.glu is not None and f.act_dtype == self.dtype for f in fused),
            "fused_mlp_gate_off": sorted({f.glu_error for f in fused if f.glu is None}),
            "fused_blocks": len(self.decoder.fused_blocks),  # ... and their norms and residual adds
            "fused_block_off": sorted(self.decoder.fused_block_off),
            "ntk_alpha": self._alpha,
            "first_step_s": self.first_step_s,
        }
        if self.device.type == "cuda":
            info["sdpa_enabled"] = [
                n
                for n, on in (
                    ("flash", torch.backends.cuda.flash_sdp_enabled()),
                    ("mem_efficient", torch.backends.cuda.mem_efficient_sdp_enabled()),
                    ("cudnn", torch.backends.cuda.cudnn_sdp_enabled()),
                    ("math", torch.backends.cuda.math_sdp_enabled()),
                )
                if on
            ]
        return info

    # ------------------------------------------------------------ internals
    def _compile_desc(self) -> str | None:
        if self.compile_mode is None:
            return None
        mode = f" mode={self.compile_mode}" if self.compile_backend == "inductor" else ""
        return f"torch.compile backend={self.compile_backend}{mode} fullgraph"

    def _choose_attention(self, model: nn.Module, attention: str) -> tuple[str, DA.Config, dict[str, Any] | None]:
        """(attention, its config, what was measured or why it fell back) for the Decoder."""
        if attention in ("sdpa", "math"):
            return attention, DA.DEFAULT_CONFIG, None
        reason = DA.unavailable(self.device)
        if attention == "triton" and reason is not None:
            raise ValueError(f"attention 'triton' unavailable: {reason}")
        if attention == "triton" and self.device.type != "cuda":
            return "triton", DA.DEFAULT_CONFIG, None  # CPU: the op's reference (or the interpreted kernel)
        if self.device.type != "cuda" or reason is not None:
            return "sdpa", DA.DEFAULT_CONFIG, {"requested": attention, "choice": "sdpa", "why": reason or "not CUDA"}
        attn = model.transformer.h[0].attn
        try:
            res = DA.tuned(self.batch_size, attn.num_heads, attn.head_dim, self.max_seq_len, self.dtype, self.device)
        except RuntimeError as e:  # every config failed its check or its compile
            if attention == "triton":
                raise
            return "sdpa", DA.DEFAULT_CONFIG, {"requested": attention, "choice": "sdpa", "why": str(e)[:300]}
        triton_s = res.seconds[res.best.name]
        choice = "triton" if attention == "triton" or triton_s < res.sdpa_s else "sdpa"
        info = {"requested": attention, "choice": choice, "at_position": res.length, "sdpa_us": res.sdpa_s * 1e6,
                "triton_us": triton_s * 1e6, "triton_config": res.best.name, "dropped": res.dropped}  # fmt: skip
        return choice, res.best, info

    def _kv_len(self, pos: int) -> int:
        if self.kv_block is None or self.decoder.attention == "triton":
            return self.max_seq_len
        return min(self.max_seq_len, -(-(pos + 1) // self.kv_block) * self.kv_block)

    def _replay(self, tokens: torch.Tensor, kv_len: int) -> torch.Tensor:
        self._tok.copy_(tokens)
        if kv_len not in self._graphs:
            # Warm up on a side stream (lazy inits, cuBLAS handles), then capture. Warm-up writes this
            # step's k, v at pos, which the replay below writes again: harmless.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.decoder(self._tok, self._pos, kv_len)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.decoder(self._tok, self._pos, kv_len)
            self._graphs[kv_len] = (graph, out)
        graph, out = self._graphs[kv_len]
        graph.replay()
        return out.clone()


ENGINES = ("hf", "fast")


def make_engine(name: str, model: nn.Module, max_seq_len: int, **kwargs: Any) -> HFEngine | FastEngine:
    """Engine registry for `qvlq profile --engine`: "hf" (eager, growing cache) or "fast" (this file;
    kwargs go to FastEngine)."""
    if name == "hf":
        return HFEngine(model)
    if name == "fast":
        return FastEngine(model, max_seq_len, **kwargs)
    raise ValueError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")


_CHAT_ENGINES: weakref.WeakKeyDictionary[nn.Module, FastEngine] = weakref.WeakKeyDictionary()
CHAT_ENGINES = ("auto", "hf", "fast")


def engine_for(model: nn.Module, needed: int, kind: str = "auto") -> HFEngine | FastEngine:
    """The engine chat() decodes a sequence of ``needed`` tokens (prompt + max_new_tokens) with.

    "auto": a FastEngine on CUDA, an HFEngine elsewhere (on CPU the eager static-cache step is no faster).
    The FastEngine captures its eager step as one CUDA graph (~1 s, no compile: a chat or a compare run
    cannot wait for torch.compile) and decodes ~12x faster than the eager loop at full size (H200:
    145-150 vs 12-13 tok/s, reports/profile/). It is kept on the model and reused while its cache is long
    enough: cache length = ``needed`` rounded up to a power of two (>= 1024), so a run of questions
    captures once; a longer request replaces it (the old cache is freed first). Its decode attention is
    the faster of SDPA and qvlq's Triton kernel on this cache length, timed when it is built (a few
    seconds, once). The cache holds ~0.5 MB per slot at full size (4.3 GB at 8192) until the model is
    gone or :func:`release_engine`.
    Weights changed in place after the first call are seen (the engine holds the model's modules);
    modules replaced by others (quantizing in place) are not: call :func:`release_engine` then."""
    if kind not in CHAT_ENGINES:
        raise ValueError(f"unknown engine {kind!r} (choose from {', '.join(CHAT_ENGINES)})")
    device = model.transformer.wte.weight.device
    if kind == "hf" or (kind == "auto" and device.type != "cuda"):
        return HFEngine(model)
    engine = _CHAT_ENGINES.get(model)
    if engine is None or engine.max_seq_len < needed:
        release_engine(model)
        length = max(1024, 1 << max(0, needed - 1).bit_length())
        engine = FastEngine(model, length, compile=False, cuda_graphs=True, attention="fastest")
        _CHAT_ENGINES[model] = engine
    engine.reset()
    return engine


def release_engine(model: nn.Module) -> None:
    """Free the static cache and CUDA graph that :func:`engine_for` keeps for ``model``."""
    if _CHAT_ENGINES.pop(model, None) is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
