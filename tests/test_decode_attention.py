"""qvlq.decode_attention: the Triton split-KV decode attention, its reference and its FastEngine wiring.

Levels:
  CPU, always   the reference against SDPA over slots 0..pos; input checks; the custom op.
  interpreter   the real kernel under TRITON_INTERPRET=1 (a subprocess running this file): positions at
                both ends and in between, splits with no slots, NaN garbage past pos, both dtypes, and a
                tiny model decoding through it in the FastEngine with the HF loop's tokens.
  compiler      Triton compiles every config for sm_80 and sm_90 on this CPU-only machine (no driver
                needed): no register spills (cuobjdump on the cubin).
  gpu           full geometry against the reference, tuning against SDPA, the engine in CUDA graphs.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from conftest import cubin_resources, cuobjdump, run_interpreted, triton_cubin

from qvlq import decode_attention as A
from qvlq.int4_triton import mismatch, precompile, triton_error
from qvlq.model.modeling import apply_rope, rope_cos_sin

HAS_CUDA = torch.cuda.is_available()


class Case(NamedTuple):
    qkv: torch.Tensor  # [B, 3, H, D]: this token's q, k (before RoPE) and v
    k: torch.Tensor  # caches [B, H, L, D]
    v: torch.Tensor
    cos: torch.Tensor  # fp32 [L, D]
    sin: torch.Tensor

    def clone(self) -> Case:
        return Case(*(t.clone() for t in self))


def case(b: int, h: int, length: int, d: int, dtype: torch.dtype, seed: int = 0, alpha: float = 1.0) -> Case:
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, 3, h, d, generator=g) * 2).to(dtype)  # * 2: peaked softmax, the max matters
    k = torch.randn(b, h, length, d, generator=g).to(dtype)
    v = torch.randn(b, h, length, d, generator=g).to(dtype)
    cos, sin = rope_cos_sin(torch.arange(length), d, 10000.0, alpha)
    return Case(qkv, k, v, cos, sin)


def sdpa_step(c: Case, pos: int, logn: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The FastEngine's "sdpa" layer, written out: (out [B, H, D] in fp32, k cache, v cache after the write)."""
    c = c.clone()
    q, k, v = (t.unsqueeze(2) for t in c.qkv.unbind(1))  # [B, H, 1, D]
    cos, sin = c.cos[pos : pos + 1], c.sin[pos : pos + 1]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if logn is not None:
        q = q * torch.tensor(logn).to(q.dtype)
    c.k.index_copy_(2, torch.tensor([pos]), k)
    c.v.index_copy_(2, torch.tensor([pos]), v)
    kf, vf = c.k[:, :, : pos + 1].float(), c.v[:, :, : pos + 1].float()
    return F.scaled_dot_product_attention(q.float(), kf, vf).squeeze(2), c.k, c.v


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("pos", [0, 5, 39])
@pytest.mark.parametrize("logn", [None, 1.3])
def test_reference_is_the_engines_sdpa_layer(pos: int, logn: float | None) -> None:
    c = case(2, 3, 40, 32, torch.bfloat16, alpha=2.0)
    c.k[:, :, pos:] = float("nan")  # stale slots past pos are never read; slot pos is written first
    want, k_want, v_want = sdpa_step(c, pos, logn)
    got_c = c.clone()
    scale = None if logn is None else torch.tensor([logn]).bfloat16()
    got = A.reference(*got_c, torch.tensor([pos]), scale, torch.float32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got_c.k.nan_to_num(), k_want.nan_to_num()) and torch.equal(got_c.v, v_want)
    assert A.reference(*c.clone(), torch.tensor([pos]), scale).dtype == torch.bfloat16


def test_checks() -> None:
    c = case(1, 2, 8, 32, torch.float32)
    p = torch.tensor([3])
    with pytest.raises(ValueError, match=r"\[B, 3, H, D\]"):
        A.check(c.qkv[:, :2], c.k, c.v, c.cos, c.sin, p, None)
    with pytest.raises(ValueError, match="does not match the cache"):
        A.check(c.qkv[:, :, :1], c.k, c.v, c.cos, c.sin, p, None)
    with pytest.raises(ValueError, match="power of two"):
        A.check(c.qkv[..., :24], c.k[..., :24], c.v[..., :24], c.cos[:, :24], c.sin[:, :24], p, None)
    with pytest.raises(ValueError, match="fp32"):
        A.check(c.qkv, c.k, c.v, c.cos.half(), c.sin.half(), p, None)
    with pytest.raises(ValueError, match="one integer position"):
        A.check(c.qkv, c.k, c.v, c.cos, c.sin, torch.tensor([1.0]), None)
    with pytest.raises(ValueError, match="unit stride"):
        A.check(c.qkv, c.k.transpose(2, 3).contiguous().transpose(2, 3), c.v, c.cos, c.sin, p, None)
    with pytest.raises(ValueError, match="one value"):
        A.check(c.qkv, c.k, c.v, c.cos, c.sin, p, torch.ones(2))


def test_op_on_cpu_and_under_compile() -> None:
    """The op writes the caches it is given, eagerly and under functionalization (aot_eager)."""
    c = case(1, 4, 24, 32, torch.float32)
    p = torch.tensor([17])
    ref_c = c.clone()
    ref = A.reference(*ref_c, p)
    eager_c = c.clone()
    assert torch.equal(A.decode_attention(*eager_c, p), ref) and torch.equal(eager_c.k, ref_c.k)
    traced = torch.compile(lambda *a: A.decode_attention(*a) * 1, backend="aot_eager", fullgraph=True)
    traced_c = c.clone()
    assert torch.equal(traced(*traced_c, p), ref)
    assert torch.equal(traced_c.k, ref_c.k) and torch.equal(traced_c.v, ref_c.v)


def test_tuned_from_disk_allocates_the_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuning read back from disk skips tune(), which allocates the split counters. tuned() must allocate them
    all the same, before any CUDA graph: else the first decode step allocates them inside inductor's graph pool,
    and inductor refuses a live allocation it did not make (seen on an H100 with a warm tuning cache)."""
    from qvlq import int4_triton

    monkeypatch.setattr(int4_triton, "_COUNTER_BUFFERS", {})
    monkeypatch.setattr(A, "TUNED", {})
    stored = A.TuneResult(A.DEFAULT_CONFIG, {A.DEFAULT_CONFIG.name: 1e-5}, {}, 8, 2e-5)
    monkeypatch.setattr(A, "remember_tune", lambda *args, **kwargs: stored)
    assert A.tuned(1, 2, 64, 16, torch.bfloat16, torch.device("cpu")) is stored
    assert torch.device("cpu") in int4_triton._COUNTER_BUFFERS


def test_unavailable() -> None:
    assert A.unavailable(torch.device("cpu")) is None
    assert "CUDA or CPU" in A.unavailable(torch.device("meta"))


# ------------------------------------------------------------------------------------------ interpreter
# (B, H, L, D): one block, a ragged last block, more splits than blocks, head dim 128 as at full size
SHAPES = [(1, 4, 37, 32), (2, 3, 200, 64), (1, 2, 70, 128)]
# the PDL config runs its other order (first K/V tile before q) with the interpreter's no-op grid waits
CONFIGS = [A.Config(16, 4, 4), A.Config(32, 8, 2), A.Config(16, 1, 4), A.Config(64, 2, 4, 1), A.Config(16, 4, 4, pdl=1)]


def _interpreter_results() -> dict[str, str | None]:
    """Runs in the subprocess (TRITON_INTERPRET=1): case -> None if it matches, else what went wrong. Each
    case: the output against the fp32 reference up to its rounding, the cache exactly as the reference
    leaves it (slot pos written with the rotated k and v, nothing else touched)."""
    out: dict[str, str | None] = {}
    for b, h, length, d in SHAPES:
        for dt in (torch.bfloat16, torch.float16):
            fresh = case(b, h, length, d, dt, alpha=3.0)
            for pos in (0, 1, length // 2, length - 1):
                c = fresh.clone()
                c.k[:, :, pos:] = float("nan")  # leftovers of a longer sequence must not leak in
                c.v[:, :, pos:] = float("nan")
                p = torch.tensor([pos])
                logn = None if pos % 2 else torch.tensor([1.0 + pos / 100]).to(dt)
                ref_c = c.clone()
                ref = A.reference(*ref_c, p, logn, torch.float32)
                for cfg in CONFIGS:
                    got_c = c.clone()
                    y = A.launch(*got_c, p, logn, cfg)
                    bad = f"dtype {y.dtype}" if y.dtype != dt else mismatch(y, ref)
                    if bad is None and not all(torch.equal(g.nan_to_num(), r.nan_to_num()) for g, r in
                                               ((got_c.k, ref_c.k), (got_c.v, ref_c.v))):  # fmt: skip
                        bad = "the cache differs from the reference's"
                    out[f"{b}x{h}x{length}x{d}-{str(dt)[6:]}-p{pos}-{cfg.name}"] = bad
    # the merge in chunks (as 64 splits merge 32 at a time): 8 splits, 2 a chunk, and a ragged run of slots
    merge, A.MERGE_SPLITS = A.MERGE_SPLITS, 2
    try:
        fresh = case(1, 2, 90, 64, torch.bfloat16, alpha=3.0)
        for pos in (0, 5, 89):
            c, p = fresh.clone(), torch.tensor([pos])
            ref = A.reference(*c.clone(), p, None, torch.float32)
            out[f"merge-in-chunks-p{pos}"] = mismatch(A.launch(*c, p, None, A.Config(8, 8, 2)), ref)
    finally:
        A.MERGE_SPLITS = merge
    c = case(2, 3, 50, 64, torch.bfloat16)
    qkv = torch.randn(3, 2, 3, 64).bfloat16().permute(1, 2, 0, 3)  # [B, 3, H, D] with shuffled strides
    p = torch.tensor([33])
    ref = A.reference(qkv, *c.clone()[1:], p, None, torch.float32)
    out["strided-qkv"] = mismatch(A.launch(qkv, *c.clone()[1:], p), ref)
    out["counters-zero"] = None if int(A.counters("cpu").abs().sum()) == 0 else "split counters not reset"
    out["engine-tokens"] = _engine_tokens_check()
    try:
        out["tune-logic"] = _tune_check()
    except RuntimeError as e:  # tune() found no working config: report it here, keep the other cases
        out["tune-logic"] = str(e)
    return out


def _tune_check() -> str | None:
    """tune() on CPU tensors with the CUDA-only pieces stubbed: every config checked at three positions, a
    bad one dropped with its reason, the fastest kept (the stub times by config), SDPA timed too, and the
    threaded precompile leaves the split counters zeroed."""
    import contextlib

    from qvlq import int4_triton

    fake_s = {"b16s4w4st2": 3e-6, "b32s2w4st2": 2e-6, "b128s2w4st1": 4e-6}
    timed: list[str] = []

    def fake_time(call, calls, repeats):  # which config is being timed: the one whose launch runs
        timed.append("")
        call(0)
        return fake_s.get(timed[-1], 5e-6)

    real_launch = A.launch

    def spy_launch(*args, **kwargs):
        cfg = args[7] if len(args) > 7 else kwargs.get("cfg", A.DEFAULT_CONFIG)
        if timed and not timed[-1]:
            timed[-1] = cfg.name
        return real_launch(*args, **kwargs)

    patches = {(A, "time_graph"): fake_time, (A, "launch"): spy_launch,
               (torch.cuda, "synchronize"): lambda *a, **k: None,
               (torch.cuda, "device"): lambda d: contextlib.nullcontext()}  # fmt: skip
    saved = {key: getattr(*key) for key in patches}
    try:
        for (mod, name), fn in patches.items():
            setattr(mod, name, fn)
        cfgs = [A.Config(16, 4, 4), A.Config(32, 2, 4), A.Config(16, 3, 4), A.Config(128, 2, 4, 1)]
        res = A.tune(1, 2, 32, 100, torch.bfloat16, torch.device("cpu"), configs=cfgs, layers=2)
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
    problems = []
    if res.best.name != "b32s2w4st2" or set(res.seconds) != set(fake_s):
        problems.append(f"best {res.best.name}, timed {sorted(res.seconds)}")
    if list(res.dropped) != ["b16s3w4st2"] or "powers of two" not in res.dropped["b16s3w4st2"]:
        problems.append(f"dropped {res.dropped}")
    if res.length != 50 or res.sdpa_s != 5e-6:
        problems.append(f"length {res.length}, sdpa {res.sdpa_s}")
    if int(int4_triton.counters("cpu").abs().sum()):
        problems.append("split counters left set")
    return "; ".join(problems) or None


def _engine_tokens_check() -> str | None:
    """The tiny model decoding through the interpreted kernel (eager and traced) gives the HF loop's tokens."""
    from test_fast import features, greedy, prompt, tiny_model

    from qvlq.fast import FastEngine
    from qvlq.generate import HFEngine

    model = tiny_model(272, layers=1)  # logN switches on while decoding (p + 1 > 272)
    ids, feats = prompt(model.config), features(272, layers=1)
    ref = greedy(HFEngine(model), ids, steps=12, image_features=feats)
    for kw in ({}, {"compile": True, "compile_backend": "aot_eager"}):
        got = greedy(FastEngine(model, 300, attention="triton", **kw), ids, steps=12, image_features=feats)
        if got[0].tolist() != ref[0].tolist() or (got[1] - ref[1]).abs().max().item() > 1e-4:
            return f"{kw or 'eager'}: tokens {got[0].tolist()} vs HF {ref[0].tolist()}"
    return None


@functools.cache
def interpreter_run() -> dict[str, str | None]:
    return run_interpreted(__file__)


INTERP_CASES = [
    f"{b}x{h}x{length}x{d}-{dt}-p{pos}-{cfg.name}"
    for b, h, length, d in SHAPES
    for dt in ("bfloat16", "float16")
    for pos in (0, 1, length // 2, length - 1)
    for cfg in CONFIGS
] + [f"merge-in-chunks-p{p}" for p in (0, 5, 89)] + ["strided-qkv", "counters-zero", "engine-tokens", "tune-logic"]

needs_triton = pytest.mark.skipif(triton_error() is not None, reason=f"needs triton: {triton_error()}")


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("case", INTERP_CASES)
def test_kernel_in_interpreter(case: str) -> None:
    results = interpreter_run()
    assert case in results, sorted(results)
    assert results[case] is None, results[case]


# ------------------------------------------------------------------------------------------ compiler
def compile_cubin(cfg: A.Config, arch: int, dtype: str = "bf16", head_dim: int = 128, asm: str = "cubin") -> bytes:
    """The kernel compiled for sm_<arch> by Triton, without a GPU or driver (its cubin, or asm="ptx")."""
    sig = {n: f"*{dtype}" for n in ("x_ptr", "k_ptr", "v_ptr", "logn_ptr", "o_ptr")}
    sig |= {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "part_ptr": "*fp32", "cnt_ptr": "*i32"}
    sig |= {n: "i32" for n in A._kernel().arg_names if n.startswith("stride_")} | {"scale": "fp32"}
    constexprs = {"D": head_dim, "BLOCK": cfg.block, "SPLITS": cfg.splits, "HAS_LOGN": True,
                  "MERGE": cfg.merge, "PDL": cfg.pdl}
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "enable_fp_fusion": False}
    return triton_cubin(A._kernel(), sig, constexprs, opts, arch, asm=asm)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_configs_compile_without_spills(arch: int) -> None:
    for cfg in A.CONFIGS + (A.PDL_CONFIGS if arch >= 90 else ()):
        line = cubin_resources(compile_cubin(cfg, arch))
        assert "STACK:0 " in line and "LOCAL:0 " in line, f"{cfg.name}: {line}"
    assert "STACK:0 " in cubin_resources(compile_cubin(A.DEFAULT_CONFIG, arch, "fp16"))
    assert "LDG.E.128" in cuobjdump("-sass", compile_cubin(A.DEFAULT_CONFIG, arch)), "no 16-byte loads of K/V"


@needs_triton
@pytest.mark.slow
def test_pdl_config_reads_only_static_data_before_its_wait() -> None:
    """A PDL program may run while c_attn (which writes x) still does. Before griddepcontrol.wait it loads only
    pos (the one 64-bit load), the cos and sin rows and its first K and V tile (16-byte loads); x and logn are
    16-bit loads and come after it, as every store and atomic does; it releases the next launch first. The
    same in ptxas' SASS (ACQBULK is the wait, PREEXIT the release). The plain configs have neither."""
    import re

    for cfg in A.PDL_CONFIGS:
        ptx = compile_cubin(cfg, 90, asm="ptx")
        body = ptx[ptx.find(".entry") :]
        assert body.count("griddepcontrol.wait") == 1 and body.count("griddepcontrol.launch_dependents") == 1
        before = body[: body.find("griddepcontrol.wait")]
        assert "ld.global" not in before[: before.find("griddepcontrol.launch_dependents")], cfg.name
        kinds = re.findall(r"\bld\.global\.([\w.]+)", before)
        assert kinds.count("b64") == 1 and sum(k in ("b32", "v2.b32") for k in kinds) == 2, (cfg.name, kinds)
        assert kinds.count("v4.b32") == len(kinds) - 3 >= 2, (cfg.name, kinds)
        assert not re.search(r"\b(st|atom|red)\.global", before), cfg.name
        assert "ld.global.b16" in body[len(before) :], cfg.name
        sass = cuobjdump("-sass", compile_cubin(cfg, 90))
        pre = sass[: sass.find("ACQBULK")]
        assert "ACQBULK" in sass and "PREEXIT" in pre and "LDG.E.128" in pre, cfg.name
        assert not re.search(r"LDG\.E\.U16|\b(STG|ATOMG|REDG|RED)\.", pre), cfg.name
    assert "griddepcontrol" not in compile_cubin(A.DEFAULT_CONFIG, 90, asm="ptx")
    assert A.Config(8, 32, 4, pdl=1).name == "b8s32w4st2-pdl" and A.configs_for(torch.device("cpu")) == A.CONFIGS


# ------------------------------------------------------------------------------------------ GPU
needs_cuda = pytest.mark.skipif(not HAS_CUDA or triton_error() is not None, reason="needs CUDA and triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("pos", [0, 255, 1039, 2078])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_full_geometry_on_cuda(pos: int, dtype: torch.dtype) -> None:
    c = Case(*(t.cuda() for t in case(1, 32, 2079, 128, dtype, alpha=2.0)))
    p = torch.tensor([pos], device="cuda")
    logn = torch.tensor([1.1], device="cuda").to(dtype)
    ref_c = c.clone()
    ref = A.reference(*ref_c, p, logn, torch.float32)
    cfgs = A.configs_for(c.k.device)  # with the PDL launches on sm_90+
    scratch = c.clone()  # compiled in threads first, as tune() does (a step's budget: ~24 configs a dtype)
    precompile([functools.partial(A.launch, *scratch, p, logn, cfg) for cfg in cfgs], c.k.device)
    for cfg in cfgs:
        got_c = c.clone()
        y = A.launch(*got_c, p, logn, cfg)
        assert mismatch(y, ref) is None, (cfg.name, mismatch(y, ref))
        assert torch.equal(got_c.k, ref_c.k) and torch.equal(got_c.v, ref_c.v), cfg.name  # RoPE'd k bit for bit
    assert int(A.counters(c.k.device).abs().sum()) == 0


@pytest.mark.gpu
@needs_cuda
def test_pdl_attention_in_a_dependent_chain_matches_plain_launches() -> None:
    """As in the fused decode step: a PDL norm -> c_attn mma launch writes qkv (the norm keeps the chain's
    values bounded), the PDL attention reads it (after loading its first K/V tile before the wait), a PDL mma
    launch with the residual reads its output; 3 layers, and steps apart by the position's increment (a launch
    without PDL, as the engine's lm_head and embedding are). Eager and captured in one CUDA graph, every output
    and cache bit for bit the plain launches'. (Run on CPU, emulated and interpreted, at h=16 d=64: equal.)"""
    from test_int4_mma import random_packed

    from qvlq import int4_mma as M

    if torch.cuda.get_device_capability() < M.PDL_CAPABILITY:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    h, d, length = 32, 128, 600
    c_attn, _ = random_packed(3 * h * d, h * d, 128, torch.bfloat16, seed=1, device="cuda")
    c_proj, _ = random_packed(h * d, h * d, 128, torch.bfloat16, seed=2, device="cuda")
    layers = [Case(*(t.cuda() for t in case(1, h, length, d, torch.bfloat16, seed=s))) for s in range(3)]
    x0 = torch.randn(1, h * d, device="cuda", generator=torch.Generator("cuda").manual_seed(3)).bfloat16()
    pos = torch.zeros(1, dtype=torch.long, device="cuda")
    gamma = (1 + 0.1 * torch.randn(h * d, device="cuda", generator=torch.Generator("cuda").manual_seed(4))).bfloat16()

    def run(pdl: int) -> list[torch.Tensor]:
        caches = [c.clone() for c in layers]
        pos.fill_(400)
        x, outs = x0, []
        for _ in range(6):
            for c in caches:
                qkv = M.gemv(x, c_attn, None, M.Config(4, 1, norm=h * d, pdl=pdl), gamma, 1e-6)
                o = A.launch(qkv.view(1, 3, h, d), c.k, c.v, c.cos, c.sin, pos, None, A.Config(8, 32, 4, pdl=pdl))
                x = M.gemv(o.view(1, h * d), c_proj, None, M.Config(8, 1, 1, 2, resid=1, pdl=pdl), None, 0.0, x)
                outs.append(o)
            pos.add_(1)
        return [x, *outs, *(t for c in caches for t in (c.k, c.v))]

    want = run(0)
    assert bool(torch.isfinite(want[0]).all())
    assert all(torch.equal(g, w) for g, w in zip(run(1), want, strict=True))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run(1)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = run(1)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert int(A.counters(pos.device).abs().sum()) == 0


@pytest.mark.gpu
@needs_cuda
def test_tune_times_sdpa_and_configs() -> None:
    res = A.tuned(1, 32, 128, 2079, torch.bfloat16, torch.device("cuda", torch.cuda.current_device()))
    assert res.sdpa_s > 0 and res.best.name in res.seconds and len(res.seconds) >= len(A.CONFIGS) // 2, res.dropped
    print({"sdpa_us": res.sdpa_s * 1e6, **{n: s * 1e6 for n, s in res.seconds.items()}})


if __name__ == "__main__" and "--interpret" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton is imported"
    print(json.dumps(_interpreter_results()))
