"""qvlq.int4_triton: the Triton int4 GEMV, its packing, reference math and QuantLinear's "triton" backend.

Three levels:
  CPU, always       packing + reference math == QuantLinear's dequantize path; the custom op (its CPU
                    implementation is the reference) under torch.compile; QuantLinear's triton wiring
                    (perm, bias, dense prefill path, lean) with the op's reference implementation.
  interpreter       the real kernel under TRITON_INTERPRET=1 (set before triton is imported, so in a
                    subprocess running this file) on small shapes; skipped when triton is not importable
                    (CI installs none; here: PYTHONPATH=<dir with triton>).
  gpu               full-size shape against tinygemm, tuning, torch.compile with CUDA graphs.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import pytest
import torch
from conftest import cubin_resources, run_interpreted, sass_main_loop, triton_cubin

from qvlq import int4_triton as T
from qvlq.gptq import GPTQ, QuantSpec
from qvlq.int4 import QuantLinear, env_backend, pack_gptq_v1, quantized_state_dict_entries, unpack_gptq_v1

HAS_CUDA = torch.cuda.is_available()


def random_linear(out: int, inp: int, group_size: int = 128, seed: int = 0, bias: bool = True) -> QuantLinear:
    """A QuantLinear with random asymmetric codes (zero points 1..16), fp16 scales and bias."""
    g = torch.Generator().manual_seed(seed)
    gs = inp if group_size == -1 else group_size
    codes = torch.randint(0, 16, (out, inp), generator=g, dtype=torch.uint8)
    scales = (torch.rand(inp // gs, out, generator=g) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(1, 17, (inp // gs, out), generator=g, dtype=torch.int32)
    g_idx = torch.arange(inp, dtype=torch.int32) // gs
    lin = QuantLinear(inp, out, 4, group_size)
    sd = pack_gptq_v1(codes, scales, zeros, g_idx, 4)
    sd["bias"] = (torch.randn(out, generator=g) if bias else torch.zeros(out)).half()
    lin.load_state_dict(sd)
    return lin


def gptq_linear(out: int = 64, inp: int = 256, group_size: int = 64, desc_act: bool = True) -> QuantLinear:
    """A GPTQ-quantized layer; desc_act gives a non-trivial g_idx (act-order), served through a perm."""
    g = torch.Generator().manual_seed(1)
    q = GPTQ((out, inp))
    q.add_batch(torch.randn(256, inp, generator=g) * torch.linspace(0.2, 3.0, inp))
    r = q.quantize(torch.randn(out, inp, generator=g) * 0.05, QuantSpec(group_size=group_size, desc_act=desc_act))
    sd = {k.split(".", 1)[1]: v for k, v in quantized_state_dict_entries("m", r, torch.randn(out, generator=g)).items()}
    lin = QuantLinear(inp, out, 4, group_size)
    lin.load_state_dict(sd)
    return lin


def group_ordered(lin: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in] in group order, zeros, scales, perm) as QuantLinear.prepare derives them."""
    codes, zeros, scales = unpack_gptq_v1(lin.qweight, lin.qzeros, lin.scales, lin.g_idx)
    perm = torch.argsort(lin.g_idx.long(), stable=True)
    return codes[:, perm], zeros, scales, perm


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize(
    "make",
    [
        lambda: random_linear(48, 256),
        lambda: random_linear(40, 384, group_size=64),
        lambda: random_linear(32, 256, group_size=-1),
        lambda: gptq_linear(desc_act=True),
    ],
    ids=["g128", "g64-ragged-n", "g-1", "act-order"],
)
def test_pack_and_reference_match_quantlinear_dequant(make):
    lin = make()
    codes, zeros, scales, perm = group_ordered(lin)
    p = T.pack(codes, zeros, scales, lin.group_size)
    assert p.qweight.dtype == torch.int32 and p.qweight.shape == (lin.in_features // 8, lin.out_features)
    assert p.scales.dtype == torch.float16 and p.zeros.dtype == torch.uint8  # 0.5 B/weight + 3 B/group
    assert torch.equal(T.unpack_codes(p), codes.T.int())
    # exact: the same s * (q - z) in fp32 as QuantLinear's own dequantization, inputs in group order
    assert torch.equal(T.dequantize(p), lin.dequantize().T[perm])
    x = torch.randn(3, lin.in_features)
    ref = lin.prepare("dequant")(x)
    torch.testing.assert_close(T.reference(x[:, perm], p, lin.bias), ref, rtol=1e-5, atol=1e-4)


def test_pack_layout_nibble_order():
    """Word j of group g holds k = g*gs + i*gs/8 + j at bits 4i: nibble i covers a contiguous run of x."""
    n, k, gs = 2, 64, 32
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[1, 32 + 2 * 4 + 3] = 5  # group 1, nibble 2, word 3
    p = T.pack(codes, torch.ones(2, n, dtype=torch.int32), torch.ones(2, n), gs)
    words = p.qweight[:, 1].tolist()
    assert words[1 * 4 + 3] == 5 << 8 and sum(1 for w in words if w) == 1


def test_pack_keeps_exact_scales_and_rejects_bad_input():
    codes = torch.randint(0, 16, (16, 128), dtype=torch.uint8)
    zeros = torch.full((1, 16), 8, dtype=torch.int32)
    s = torch.rand(1, 16)  # not fp16 values: kept in fp32 so the weight stays exact
    assert T.pack(codes, zeros, s, 128).scales.dtype == torch.float32
    with pytest.raises(ValueError, match="power of two"):
        T.pack(codes, zeros, s, 96)
    with pytest.raises(ValueError, match="multiple of the group"):
        T.pack(codes[:, :96], zeros, s, 64)
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        T.pack(codes + 16, zeros, s, 128)
    with pytest.raises(ValueError, match="must be"):
        T.pack(codes, zeros[:, :8], s, 128)


def test_custom_op_is_the_reference_on_cpu_and_traces_with_fullgraph():
    lin = random_linear(48, 256)
    codes, zeros, scales, _ = group_ordered(lin)
    p = T.pack(codes, zeros, scales, 128)
    bias = lin.bias.bfloat16()
    x = torch.randn(1, 256).bfloat16()
    y = T.gemv(x, p, bias)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 48)
    assert torch.equal(y, T.reference(x, p, bias))
    args = (x, p.qweight, p.scales, p.zeros, bias, 128, 64, 2, 4, 2, 1, "direct")
    torch.library.opcheck(torch.ops.qvlq.int4_gemv.default, args)
    compiled = torch.compile(lambda v: T.gemv(v, p, bias) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), y * 2)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Let QuantLinear build the triton backend on the CPU: the op then runs its reference math, which
    checks the wiring (perm, bias, dense path, lean) without a GPU."""
    real = QuantLinear._int4_ok
    monkeypatch.setattr(QuantLinear, "_int4_ok", lambda self, b: None if b == "triton" else real(self, b))


@pytest.mark.parametrize("desc_act", [False, True])
def test_quantlinear_triton_wiring(triton_on_cpu, desc_act):
    lin = gptq_linear(desc_act=desc_act)
    ref = gptq_linear(desc_act=desc_act).prepare("dequant")
    lin.prepare("triton")
    assert lin.backend == "triton" and ("perm" in lin._cache) == desc_act
    assert lin._cache["tcfg"] == T.DEFAULT_CONFIG and lin.dequant_rows == 32
    for shape in [(1, 256), (2, 3, 256)]:
        x = torch.randn(shape)
        torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-4)
    x = torch.randn(40, 256)  # past dequant_rows: the dense path, dequantizing the kernel's copy
    torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-4)
    xb = torch.randn(3, 256).bfloat16()
    yb = lin(xb)
    assert yb.dtype == torch.bfloat16
    # the stored (fp16) bias is added in fp32, not first rounded to bf16 (that put outputs near zero off by
    # up to ~2^-9 |bias|: the full-size GPU test caught it)
    exact = xb.float() @ ref.dequantize().T.float() + ref.bias.float()
    assert T.mismatch(yb, exact) is None
    lean = gptq_linear(desc_act=desc_act).prepare("triton", lean=True)
    assert lean.dequant_rows == 32  # triton keeps its dense path: it reads only the kernel's copy
    torch.testing.assert_close(lean(x), ref(x), rtol=1e-5, atol=1e-4)


def test_backend_requests_and_env(monkeypatch):
    lin = random_linear(48, 256)
    with pytest.raises(ValueError, match="triton needs the layer on a CUDA device"):
        random_linear(48, 256).prepare("triton")
    assert lin.prepare("fastest").backend == "dequant"  # on CPU: as auto
    monkeypatch.setenv("QVLQ_INT4_BACKEND", "triton")
    assert env_backend() == "triton"
    assert lin.prepare().backend == "dequant"  # the variable only steers layers on CUDA
    monkeypatch.setenv("QVLQ_INT4_BACKEND", "tinygemm")
    with pytest.raises(ValueError, match="QVLQ_INT4_BACKEND"):
        env_backend()
    monkeypatch.delenv("QVLQ_INT4_BACKEND")
    assert env_backend() is None


# ------------------------------------------------------------------------------------------ interpreter
# (N, K, group): ragged N against every block_n, a K whose steps do not divide evenly among splits
INTERP_SHAPES = [(48, 256, 128), (40, 384, 64)]
INTERP_CONFIGS = [T.Config(16, 2, 4, 2), T.Config(32, 2, 4, 2, 3, "sem"), T.Config(16, 1, 4, 2, 4, "atomic")]
INTERP_CASES = [
    f"{n}x{k}g{gs}-m{m}-{dt}-{cfg.name}"
    for n, k, gs in INTERP_SHAPES
    for m, dt in [(1, "bfloat16"), (3, "float16"), (1, "float16")]
    for cfg in INTERP_CONFIGS
] + ["act-order-m1-bfloat16", "act-order-m3-float16", "no-bias-m1-bfloat16"]


def _interpreter_results() -> dict[str, str | None]:
    """Runs in the subprocess (TRITON_INTERPRET=1): case id -> None if the kernel matches, else the mismatch."""
    out: dict[str, str | None] = {}
    torch.manual_seed(0)
    for n, k, gs in INTERP_SHAPES:
        codes, zeros, scales, _ = group_ordered(random_linear(n, k, gs))
        p = T.pack(codes, zeros, scales, gs)
        bias = torch.randn(n)
        for m, dt in [(1, "bfloat16"), (3, "float16"), (1, "float16")]:
            x = torch.randn(m, k).to(getattr(torch, dt))
            for cfg in INTERP_CONFIGS:
                b = bias.to(x.dtype)
                y = T.launch(x, p, b, cfg)
                ref_b = T.reference(x.float(), p, b)
                out[f"{n}x{k}g{gs}-m{m}-{dt}-{cfg.name}"] = (
                    f"dtype {y.dtype}" if y.dtype != x.dtype else T.mismatch(y, ref_b)
                )
    # act-order through QuantLinear's own perm and packing (prepared on the CPU: see triton_on_cpu)
    real = QuantLinear._int4_ok
    QuantLinear._int4_ok = lambda self, b: None if b == "triton" else real(self, b)
    lin = gptq_linear(desc_act=True).prepare("triton")
    ref_lin = gptq_linear(desc_act=True).prepare("dequant")
    for m, dt in [(1, "bfloat16"), (3, "float16")]:
        x = torch.randn(m, 256)
        xd = x.to(getattr(torch, dt))
        y = T.launch(xd[:, lin._cache["perm"]], lin._cache["tpack"], lin.bias, T.Config(32, 2, 4, 2))  # fp16 bias
        ref = ref_lin(xd.float()).float()  # fp32 math on the same (rounded) x
        out[f"act-order-m{m}-{dt}"] = T.mismatch(y, ref)
    lin2 = random_linear(48, 256, bias=False)
    codes, zeros, scales, _ = group_ordered(lin2)
    p = T.pack(codes, zeros, scales, 128)
    x = torch.randn(1, 256).bfloat16()
    y = T.launch(x, p, None, T.Config(64, 1, 4, 2, 2, "sem"))
    out["no-bias-m1-bfloat16"] = T.mismatch(y, T.reference(x.float(), p))
    out["counters-zero"] = None if int(T.counters("cpu").abs().sum()) == 0 else "split-K counters not reset"
    return out


@functools.cache
def interpreter_run() -> dict[str, str | None]:
    return run_interpreted(__file__)


needs_triton = pytest.mark.skipif(
    T.triton_error() is not None, reason=f"Triton interpreter tests need triton: {T.triton_error()}"
)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("case", INTERP_CASES + ["counters-zero"])
def test_kernel_in_interpreter(case):
    results = interpreter_run()
    assert case in results, sorted(results)
    assert results[case] is None, results[case]


# ------------------------------------------------------------------------------------------ compiler
def compile_cubin(cfg: T.Config, arch: int, dtype: str = "bf16", group: int = 128) -> bytes:
    """The kernel compiled for sm_<arch> by Triton as the JIT specializes it at full size (no GPU needed)."""
    sig = {"x_ptr": f"*{dtype}", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "b_ptr": "*fp16",
           "y_ptr": f"*{dtype}", "part_ptr": "*fp32", "cnt_ptr": "*i32"}  # fmt: skip
    ints = ("N", "KW", "KW_PER_SPLIT", "stride_xm", "stride_ym")
    sig |= {n: "i32" for n in ints}
    constexprs = {"GROUP": group, "BLOCK_N": cfg.block_n, "GPI": cfg.groups_per_iter, "SPLIT_K": cfg.split_k,
                  "MODE": T._MODES[cfg.mode], "HAS_BIAS": False, "ASM": True}  # fmt: skip
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton_cubin(T._kernel(), sig, constexprs, opts, arch, divisible=ints)


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_lean(arch: int) -> None:
    """No config spills, and the main loop stays near 5 instructions a weight (the dequantization is one
    shift and one and-or a code, the multiply-add one FFMA; 6.1 before the 1 + q/16 placement)."""
    for cfg in T.CONFIGS:
        line = cubin_resources(compile_cubin(cfg, arch))
        assert "STACK:0 " in line and "LOCAL:0 " in line, f"{cfg.name}: {line}"
    cfg = T.DEFAULT_CONFIG
    loop = sass_main_loop(compile_cubin(cfg, arch))
    weights = cfg.block_n * cfg.groups_per_iter * 128 // 8 * 8 / (cfg.num_warps * 32)  # a thread's, per step
    assert len(loop) / weights < 5.5, f"{len(loop)} instructions for {weights:.0f} weights a thread"
    assert any("LDG.E.128" in ins for ins in loop), "no 16-byte weight loads"


# ------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or T.triton_error() is not None, reason="needs CUDA and triton")
@pytest.mark.parametrize("out_in", [(4096, 11008), (12288, 4096)], ids=["mlp.c_proj", "c_attn"])
def test_full_size_against_tinygemm(out_in):
    out, inp = out_in
    lin = random_linear(out, inp, seed=3).cuda()
    tri = random_linear(out, inp, seed=3).cuda().prepare("triton")
    tiny = random_linear(out, inp, seed=3).cuda().prepare("int4_cuda")
    w = lin.dequantize().T  # fp32 [in, out]
    for m, dt in [(1, torch.bfloat16), (1, torch.float16), (3, torch.bfloat16)]:
        x = torch.randn(m, inp, device="cuda").to(dt)
        ref = x.float() @ w + lin.bias.float()
        y_t, y_c = tri(x), tiny(x)
        assert y_t.dtype == dt
        assert T.mismatch(y_t, ref) is None, T.mismatch(y_t, ref)
        # tinygemm rounds scales and partial sums to bf16: it is the less exact of the two
        assert T.rel_error(y_t, ref) <= T.rel_error(y_c, ref) + 1e-3
    res = T.TUNED[(out, inp, 128, 1, torch.bfloat16, torch.float16)]
    assert res.best.name in res.seconds and len(res.seconds) >= len(T.CONFIGS) // 2, res.dropped


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA or T.triton_error() is not None, reason="needs CUDA and triton")
def test_fastest_records_and_compiled_graph_matches_eager(monkeypatch):
    from qvlq import int4

    monkeypatch.delenv(int4.ENV_CANDIDATES, raising=False)  # gpu_checks.sh narrows it for its profile
    monkeypatch.setattr(int4, "FASTEST", {})
    lin = gptq_linear(out=256, inp=512, group_size=128, desc_act=True).cuda().prepare("fastest")
    assert lin.backend in int4.CUDA_KERNELS
    rec = [r for r in int4.fastest_choices() if (r["out_features"], r["in_features"]) == (256, 512)]
    assert rec and rec[0]["choice"] == lin.backend and rec[0]["triton_us"] > 0 and rec[0]["int4_cuda_us"] > 0
    tri = gptq_linear(out=256, inp=512, group_size=128, desc_act=True).cuda().prepare("triton")
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
    eager = tri(x)
    step = torch.compile(tri, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = step(x).clone()
    assert T.mismatch(got, eager.float()) is None  # "atomic" split-K configs sum in any order


if __name__ == "__main__" and "--interpret" in sys.argv:
    assert os.environ.get("TRITON_INTERPRET") == "1", "set TRITON_INTERPRET=1 before triton is imported"
    print(json.dumps(_interpreter_results()))


def test_kernel_selection_reports_what_was_measured(monkeypatch) -> None:
    from qvlq import int4, int4_mma, int4_triton
    from qvlq.profile_report import _selection_text

    monkeypatch.setattr(int4, "FASTEST", {})
    monkeypatch.setattr(int4_triton, "TUNED", {})
    monkeypatch.setattr(int4_mma, "TUNED", {})
    assert int4.kernel_selection() == []
    mcfg = int4_mma.DEFAULT_CONFIG
    int4_mma.TUNED[(4096, 4096, 128, torch.bfloat16)] = int4_mma.TuneResult(mcfg, {mcfg.name: 7e-6}, {})
    (only,) = int4.kernel_selection()
    assert _selection_text(only) == f"4096->4096: mma 7.0 us [{mcfg.name}] -> mma"
    int4_mma.TUNED.clear()
    cfg = int4_triton.DEFAULT_CONFIG
    int4_triton.TUNED[(4096, 11008, 128, 1, torch.bfloat16, torch.float16)] = int4_triton.TuneResult(
        cfg, {cfg.name: 20e-6}, {}
    )
    (only,) = int4.kernel_selection()
    assert only["choice"] == "triton" and only["dtype"] == "bfloat16" and only["triton_us"] == pytest.approx(20.0)
    assert _selection_text(only) == f"11008->4096: triton 20.0 us [{cfg.name}] -> triton"
    int4.FASTEST[(4096, 4096, 128, "bfloat16")] = {
        "out_features": 4096, "in_features": 4096, "group_size": 128, "dtype": "bfloat16", "choice": "int4_cuda",
        "int4_cuda_us": 9.5, "triton_us": 12.25, "triton_config": cfg.name,
    }  # fmt: skip
    (chosen,) = int4.kernel_selection()  # the fastest-vs choices win over the bare tuning results
    assert _selection_text(chosen) == f"4096->4096: int4_cuda 9.5 us, triton 12.2 us [{cfg.name}] -> int4_cuda"
    int4.FASTEST[(4096, 4096, 128, "bfloat16")].update(mma_us=6.0, mma_config="w8t1", choice="mma")
    (chosen,) = int4.kernel_selection()
    assert _selection_text(chosen).endswith(f"triton 12.2 us [{cfg.name}], mma 6.0 us [w8t1] -> mma")


def test_fastest_records_a_kernel_that_cannot_be_tuned_and_uses_the_others(monkeypatch) -> None:
    """prepare("fastest") on a layer where one kernel has no working config: the others are timed, the failure
    is recorded (and shown in the profile report) instead of failing the model's preparation."""
    import types

    from qvlq import int4, int4_mma
    from qvlq.profile_report import _selection_text

    monkeypatch.setattr(int4, "FASTEST", {})
    monkeypatch.setenv(int4.ENV_CANDIDATES, "triton,mma")
    monkeypatch.setattr(QuantLinear, "_int4_ok", lambda self, backend: None)

    def no_config(*args, **kwargs):
        raise RuntimeError("no Triton int4 config works for N=64 K=256: {'n64g2w4s2': 'mismatch'}")

    monkeypatch.setattr(T, "tuned", no_config)
    monkeypatch.setattr(int4_mma, "tuned", lambda p: types.SimpleNamespace(best=int4_mma.DEFAULT_CONFIG,
                                                                           seconds={"w8t1": 5e-6}))  # fmt: skip
    lin = random_linear(64, 256)
    codes, zeros, scales, _ = group_ordered(lin)
    assert lin._fastest(codes, zeros, scales, 128, torch.bfloat16) == "mma"
    (rec,) = int4.fastest_choices()
    assert rec["triton_error"].startswith("no Triton int4 config") and rec["mma_us"] == pytest.approx(5.0)
    assert _selection_text(rec) == "256->64: triton failed (no Triton int4 config works for N=64 K=256: " \
        "{'n64g2w4s2': 'mismatch'}), mma 5.0 us [w8t1] -> mma"
    monkeypatch.setattr(int4_mma, "tuned", no_config)
    int4.FASTEST.clear()
    with pytest.raises(RuntimeError, match="no int4 CUDA kernel could be timed"):
        lin._fastest(codes, zeros, scales, 128, torch.bfloat16)
