"""qvlq.int4_mma: the tensor-core int4 GEMV, its packing, its lane-by-lane model and QuantLinear's "mma" backend.

Levels:
  CPU, always   packing round trip; `emulate` (the kernel's register recipe and the PTX fragment layout,
                lane by lane) against the dense reference, and that it notices a layout error; the custom
                op under torch.compile; QuantLinear's wiring.
  compilers     the CUDA source through nvcc (registers, spills) and through qvlq's own NVRTC path, each
                skipped where that compiler is absent (CI: nvcc is on the machine, install.sh adds NVRTC).
  gpu           the kernel against the reference at full-size shapes, in a compiled CUDA graph, and in
                prepare("fastest").
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from test_int4_triton import gptq_linear, random_linear

from qvlq import int4_mma as M
from qvlq.int4_triton import mismatch, rel_error

HAS_CUDA = torch.cuda.is_available()


def random_packed(
    n: int, k: int, gs: int, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> tuple[M.Packed, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    groups = k // (k if gs == -1 else gs)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8, device=device)
    zeros = torch.randint(0, 17, (groups, n), generator=g, device=device)
    scales = (torch.rand(groups, n, generator=g, device=device) * 0.02 + 1e-3).half()
    return M.pack(codes, zeros, scales, gs, dtype), codes


SHAPES = [(32, 256, 64), (48, 512, 128), (16, 1024, 256), (32, 1024, 512), (16, 512, -1)]


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,gs", SHAPES)
def test_pack_round_trip(n, k, gs, dtype):
    g = torch.Generator().manual_seed(1)
    groups = k // (k if gs == -1 else gs)
    codes = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    zeros = torch.randint(0, 128, (groups, n), generator=g)
    scales = torch.rand(groups, n, generator=g).half()
    p = M.pack(codes, zeros, scales, gs, dtype)
    c, z, s = M.unpack(p)
    assert torch.equal(c, codes) and torch.equal(z, zeros.int()) and torch.equal(s, scales.float())
    size = k if gs == -1 else gs  # and the dense weight, W[k, n] = s * (q - z), rounded once
    want = (codes.T.int().view(-1, size, n) - zeros.unsqueeze(1)).float() * scales.float().unsqueeze(1)
    for out in (torch.float32, dtype):
        assert torch.equal(M.dequantize(p, out), want.reshape(k, n).to(out))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,gs", SHAPES)
@pytest.mark.parametrize("rows,bias", [(1, True), (3, False)])
def test_emulated_kernel_matches_reference(n, k, gs, dtype, rows, bias):
    p, _ = random_packed(n, k, gs, dtype)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(2)).to(dtype)
    b = torch.randn(n).half() if bias else None
    y = M.emulate(x, p, b)
    assert y.dtype == dtype and y.shape == (rows, n)
    assert mismatch(y, M.reference(x.float(), p, b)) is None


@pytest.mark.parametrize("break_it", ["swap lanes", "swap words", "shift x"])
def test_emulation_notices_a_layout_error(break_it):
    """The model must be able to fail: a wrong lane or word order, or x read one chunk off, is far off."""
    p, _ = random_packed(32, 512, 128, torch.bfloat16)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    ref = M.reference(x.float(), p)
    q = p.qweight.clone()
    if break_it == "swap lanes":
        q[:, :, [0, 4]] = q[:, :, [4, 0]]
    elif break_it == "swap words":
        q[..., [0, 1]] = q[..., [1, 0]]
    else:
        x = torch.roll(x, 64, dims=1)
    assert mismatch(M.emulate(x, p._replace(qweight=q)), ref) is not None


def test_lane_map_covers_each_tile_and_chunk_once():
    row, k = M._lane_map(torch.device("cpu"))
    cells = set(zip((row * 64 + k).flatten().tolist(), strict=True))
    assert len(cells) == 16 * 64  # every (row, input) of a 16 x 64 block exactly once


def test_shape_and_value_checks():
    assert M.check_shape(4096, 11008, 128) is None and M.check_shape(12288, 4096, -1) is None
    assert "multiple of 16" in M.check_shape(40, 256, 64)
    assert "multiple of 256" in M.check_shape(32, 384, 128)
    assert "group size" in M.check_shape(32, 512, 32)
    codes = torch.zeros(16, 256, dtype=torch.uint8)
    with pytest.raises(ValueError, match="zero points"):
        M.pack(codes, torch.full((2, 16), 128), torch.ones(2, 16), 128)
    with pytest.raises(ValueError, match="4-bit"):
        M.pack(codes + 16, torch.ones(2, 16), torch.ones(2, 16), 128)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        M.pack(codes, torch.ones(2, 16), torch.ones(2, 16), 128, torch.float32)
    p, _ = random_packed(16, 256, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="packed for"):
        M.gemv(torch.randn(1, 256).half(), p)


def test_launch_checks_its_inputs_before_any_cuda_call():
    p, _ = random_packed(32, 256, 128, torch.bfloat16)
    empty = M.launch(torch.empty(0, 256, dtype=torch.bfloat16), p, None)
    assert empty.shape == (0, 32)
    x = torch.randn(1, 256).to(torch.bfloat16)
    with pytest.raises(ValueError, match="bias has 16 values"):
        M.launch(x, p, torch.zeros(16), M.DEFAULT_CONFIG)
    strided = torch.zeros(*p.qweight.shape[:-1], 8, dtype=torch.int32)[..., ::2]
    strided.copy_(p.qweight)
    with pytest.raises(ValueError, match="contiguous"):
        M.launch(x, p._replace(qweight=strided), None)
    with pytest.raises(ValueError, match="does not split into its blocks"):
        M.launch(x, random_packed(16, 256, 128, torch.bfloat16)[0], None, M.Config(4, 2))
    with pytest.raises(ValueError, match="does not split into its blocks"):  # glu: two halves of whole tiles
        M.launch(x, random_packed(48, 256, 128, torch.bfloat16)[0], None, M.Config(4, 1, glu=1))
    assert M.launch(torch.empty(0, 256, dtype=torch.bfloat16), p, None, M.Config(4, 1, glu=1)).shape == (0, 16)


def test_fastest_candidates_follow_the_environment(monkeypatch):
    from qvlq import int4

    monkeypatch.delenv(int4.ENV_CANDIDATES, raising=False)
    assert int4.fastest_candidates() == int4.CUDA_KERNELS
    monkeypatch.setenv(int4.ENV_CANDIDATES, "int4_cuda, mma")
    assert int4.fastest_candidates() == ("int4_cuda", "mma")
    monkeypatch.setenv(int4.ENV_CANDIDATES, "marlin")
    with pytest.raises(ValueError, match="QVLQ_INT4_CANDIDATES"):
        int4.fastest_candidates()


def test_custom_op_under_compile_matches_emulation():
    p, _ = random_packed(32, 512, 128, torch.bfloat16)
    x = torch.randn(2, 512).to(torch.bfloat16)
    eager = M.gemv(x, p, None, M.Config(4, 2))
    compiled = torch.compile(lambda t: M.gemv(t, p, None, M.Config(4, 2)), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager) and torch.equal(eager, M.emulate(x, p))


def test_quantlinear_wiring_on_cpu(monkeypatch):
    """QuantLinear's mma path (perm for act-order, fp32 bias, dtype cast, dense many-row path from its own
    copy) with the op's CPU implementation, against the dequant backend."""
    from qvlq import int4

    lin = gptq_linear(out=32, inp=256, group_size=128, desc_act=True)
    assert "CUDA" in lin._int4_ok("mma")
    with pytest.raises(ValueError, match="mma"):
        lin.prepare("mma")
    monkeypatch.setattr(int4.QuantLinear, "_int4_ok", lambda self, backend: None)
    lin.prepare("mma", lean=True)
    assert lin.backend == "mma" and "perm" in lin._cache and "mpack" in lin._cache
    ref = gptq_linear(out=32, inp=256, group_size=128, desc_act=True).prepare("dequant")
    for rows, dt in [(1, torch.bfloat16), (2, torch.float32), (40, torch.bfloat16)]:  # 40 >= DEQUANT_ROWS
        x = torch.randn(rows, 256).to(dt)
        y, want = lin(x), ref(x.to(torch.bfloat16).float())  # the kernel reads bf16 activations
        assert y.dtype == dt
        if rows < lin.dequant_rows:  # the kernel: exact up to its output rounding
            assert mismatch(y.to(torch.bfloat16), want) is None
        else:  # the dense path: a bf16 weight and a bf16 GEMM
            assert rel_error(y, want) < 1e-2


def test_fuse_mma_only_where_one_launch_computes_the_same(monkeypatch):
    """fuse_mma joins two mma layers that read the same input (bias kept per layer, in fp32) into the MLP's
    gate a(x) * silu(b(x)); the gate is in the kernel where the sizes match and the glu block fits. It declines
    other backends, act-order gathers and different configs, so the caller keeps two calls there."""
    from qvlq import int4

    monkeypatch.setattr(int4.QuantLinear, "_int4_ok", lambda self, backend: None)
    a = gptq_linear(out=32, inp=256, group_size=128, desc_act=False).prepare("mma")
    b = gptq_linear(out=32, inp=256, group_size=128, desc_act=False).prepare("mma")
    b.bias.zero_()
    b.prepare("mma")  # b without a bias, a with one
    x = torch.randn(3, 256).to(torch.bfloat16)
    want = (a(x), b(x))
    fused = int4.fuse_mma(a, b)
    assert fused is not None and fused.bias is not None and fused.split == 32
    assert fused.glu == a._cache["mcfg"]._replace(glu=1) and fused.glu_error is None
    assert all(torch.equal(f, w) for f, w in zip(fused.pair(x), want, strict=True))
    assert torch.equal(fused(x), want[0] * torch.nn.functional.silu(want[1]))  # the CPU model: torch's ops
    assert torch.equal(a(x), want[0]) and torch.equal(b(x), want[1])  # the layers, on their views
    assert int4.fuse_mma(a, b) is fused
    c, d = (gptq_linear(out=32, inp=256, group_size=128, desc_act=False).prepare("mma") for _ in range(2))
    for m in (c, d):
        m._cache["mcfg"] = M.Config(16, 1)  # its glu block would take 1024 threads: one GEMV, torch's gate
    no_glu = int4.fuse_mma(c, d)
    assert no_glu.glu is None and "w16t1" in no_glu.glu_error
    yc, yd = c(x), d(x)
    assert torch.equal(no_glu(x[:, None]), (yc * torch.nn.functional.silu(yd))[:, None])
    assert int4.fuse_mma(c, gptq_linear(out=48, inp=256, group_size=128, desc_act=False).prepare("mma")) is None
    plain = dict(inp=256, group_size=128, desc_act=False)
    assert int4.fuse_mma(a, gptq_linear(**plain).prepare("dequant")) is None
    assert int4.fuse_mma(a, gptq_linear(inp=256, group_size=128, desc_act=True).prepare("mma")) is None  # a gather
    other = gptq_linear(**plain).prepare("mma")
    other._cache["mcfg"] = M.Config(4, 2)
    assert int4.fuse_mma(gptq_linear(**plain).prepare("mma"), other) is None
    b.prepare("mma")  # prepared again: its own copy back, the pair no longer shared
    assert b._cache.get("fused") is None and torch.equal(b(x), want[1])


def test_variant_tuner_checks_drops_and_picks_the_fastest(monkeypatch):
    """tune_variant: each candidate's fused block is checked against its plain config with the model's ops
    around it; blocks that do not fit and launches that disagree are dropped with the reason; the fastest of
    the rest wins. The timer is injected here (CUDA graphs need a GPU); the check runs the CPU op."""
    p, _ = random_packed(64, 256, 128, torch.bfloat16, seed=2)
    bias = torch.randn(64)
    times = iter([3e-6, 1e-6, 2e-6])
    ran = []

    def timer(call, calls, repeats):
        ran.append(call(0))  # the timed call runs (the CPU op here)
        return next(times)

    cands = [M.Config(4, 1), M.Config(16, 1), M.Config(8, 1), M.Config(4, 2), M.Config(4, 1)]
    res = M.tune_variant(p, bias, {"glu": 1, "norm": 256}, cands, timer=timer)
    assert list(res.seconds) == ["w4t1-norm-glu", "w8t1-norm-glu", "w4t2-norm-glu"]  # w4t1 timed once
    assert res.best == M.Config(8, 1, glu=1, norm=256) and len(ran) == 3 and ran[0].shape == (1, 32)
    assert "threads" in res.dropped["w16t1-norm-glu"]

    plain_gemv = M.gemv

    def buggy(x, p, bias=None, cfg=M.DEFAULT_CONFIG, gamma=None, eps=0.0, resid=None):
        y = plain_gemv(x, p, bias, cfg, gamma, eps, resid)
        return y + 1 if cfg.resid and cfg.warps == 8 else y  # a wrong epilogue in one block shape

    monkeypatch.setattr(M, "gemv", buggy)
    res = M.tune_variant(p, bias, {"resid": 1}, [M.Config(8, 1), M.Config(4, 1)], timer=lambda c, n, r: 1e-6)
    assert res.best == M.Config(4, 1, resid=1) and "mismatch" in res.dropped["w8t1-res"]
    with pytest.raises(RuntimeError, match="no res variant works"):
        M.tune_variant(p, bias, {"resid": 1}, [M.Config(8, 1)], timer=lambda c, n, r: 1e-6)


def test_variant_candidates_follow_the_plain_tuning(monkeypatch):
    """The variant tuner starts from the layer's own config, then the plain tuner's next fastest on the shape."""
    p, _ = random_packed(64, 256, 128, torch.bfloat16)
    assert M.ranked_configs(M.Config(4, 1), p) == [M.Config(4, 1)]  # nothing timed on this shape
    timed = {"w8t1": 3.0, "w4t1": 1.0, "w4t1s3": 2.0, "w16t1": 4.0, "w4t2": 5.0, "w2t1s4": 6.0}
    key = (p.out_features, p.in_features, p.group_size, p.dtype)
    monkeypatch.setitem(M.TUNED, key, M.TuneResult(M.Config(4, 1), timed, {}))
    names = [c.name for c in M.ranked_configs(M.Config(8, 1), p, k=4)]
    assert names == ["w8t1", "w4t1", "w4t1s3", "w16t1"]


# ------------------------------------------------------------------------------------------ compilers
def _nvcc(tmp_path, arch: str, dtype: torch.dtype, gs: int, cfg: M.Config) -> str:
    src = tmp_path / "k.cu"
    src.write_text(M.SOURCE)
    cmd = ["nvcc", "-cubin", f"-arch={arch}", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(src)]
    cmd += [f"-D{k}={v}" for k, v in M.defines(dtype, gs, cfg).items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_source_compiles_without_spills(tmp_path, arch, dtype):
    every = arch == "sm_90" and dtype == torch.bfloat16  # all configurations once; both fence variants always
    for cfg in M.CONFIGS if every else (M.Config(8, 1, 1), M.Config(8, 1, 0)):  # group 128: no local memory
        log = _nvcc(tmp_path, arch, dtype, 128, cfg)
        assert "0 bytes spill stores" in log and "0 bytes spill loads" in log, log
    for gs in (64, 256, 1024):
        _nvcc(tmp_path, arch, dtype, gs, M.DEFAULT_CONFIG)
    glu = [g for c in M.CONFIGS if (g := M.variant(c, 128, glu=1)) is not None]
    assert len(glu) >= 10 and M.variant(M.Config(4, 1), 128, glu=1) == M.Config(4, 1, glu=1)
    # the fused-block variants: the glu block (the same work per warp), the norm prologue, the residual add
    block = [v for c in M.CONFIGS for f in (dict(glu=1), dict(glu=1, norm=4096), dict(norm=4096), dict(resid=1))
             if (v := M.variant(c, 128, **f)) is not None]  # fmt: skip
    assert len(block) >= 40
    for cfg in block if every else block[:4]:
        log = _nvcc(tmp_path, arch, dtype, 128, cfg)
        assert "0 bytes spill stores" in log and "0 bytes spill loads" in log, (cfg.name, log)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_pdl_configs_compile_and_wait_only_on_sm90(tmp_path):
    """PDL configs: the grid dependency wait and release in the sm_90 PTX, neither for sm_80 (no such
    instruction there: the tuner offers PDL configs on sm_90+ only) nor without PDL; no spills."""
    src = tmp_path / "k.cu"
    src.write_text(M.SOURCE)

    def ptx(arch: str, cfg: M.Config) -> str:
        cmd = ["nvcc", "-ptx", f"-arch={arch}", "-o", str(tmp_path / "k.ptx"), str(src)]
        cmd += [f"-D{k}={v}" for k, v in M.defines(torch.bfloat16, 128, cfg).items()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return (tmp_path / "k.ptx").read_text()

    def plain_loads(code: str) -> int:  # coherent global loads of the mma kernel (not ld.global.nc)
        body = code[code.index(".entry qvlq_int4_mma") :]
        return len(re.findall(r"\bld\.global(?!\.nc)", body[: body.find(".entry qvlq_int4_dequant")]))

    for cfg in (M.Config(4, 1, pdl=1), M.Config(4, 1, 1, 3, pdl=1), M.Config(4, 1, norm=4096, glu=1, pdl=1),
                M.Config(8, 1, 1, 2, resid=1, pdl=1)):  # fmt: skip
        code, plain = ptx("sm_90", cfg), ptx("sm_90", cfg._replace(pdl=0))
        assert code.count("griddepcontrol.wait") == 1 and code.count("griddepcontrol.launch_dependents") == 1
        assert "griddepcontrol" not in ptx("sm_80", cfg) and "griddepcontrol" not in plain
        # x and resid, written by the kernel before, are not read through the non-coherent path under PDL
        assert plain_loads(plain) == 0 and plain_loads(code) >= (0 if cfg.stages and not cfg.resid else 1), cfg.name
        log = _nvcc(tmp_path, "sm_90", torch.bfloat16, 128, cfg)
        assert "0 bytes spill stores" in log and "0 bytes spill loads" in log, (cfg.name, log)
    assert [c.name for c in M.PDL_CONFIGS[:2]] == ["w4t1-pdl", "w8t1-pdl"]
    assert M.Config(4, 1, 1, 3, norm=8, pdl=1).name == "w4t1s3-pdl-norm"
    assert M.configs_for(torch.device("cpu")) == M.CONFIGS


@pytest.mark.skipif(not Path("/usr/local/cuda/include/cuda.h").exists() or shutil.which("gcc") is None,
                    reason="needs cuda.h and gcc")  # fmt: skip
def test_launch_structs_match_cuda_h(tmp_path):
    """The ctypes CUlaunchConfig / CUlaunchAttribute that a PDL launch hands cuLaunchKernelEx have cuda.h's
    sizes and offsets, and the attribute id is cuda.h's."""
    import ctypes

    prog = tmp_path / "layout.c"
    prog.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <cuda.h>\nint main(void) {\n"
        'printf("%zu %zu %zu %zu %zu %zu %zu %d\\n", sizeof(CUlaunchAttribute), offsetof(CUlaunchAttribute, value),'
        " sizeof(CUlaunchConfig), offsetof(CUlaunchConfig, hStream), offsetof(CUlaunchConfig, attrs),"
        " offsetof(CUlaunchConfig, numAttrs), offsetof(CUlaunchConfig, sharedMemBytes),"
        " (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);\nreturn 0; }\n"
    )
    exe = tmp_path / "layout"
    cmd = ["gcc", "-I/usr/local/cuda/include", str(prog), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = [int(v) for v in subprocess.run([str(exe)], capture_output=True, text=True).stdout.split()]
    A, C = M.LaunchAttribute, M.LaunchConfig
    got = [ctypes.sizeof(A), A.value.offset, ctypes.sizeof(C), C.hStream.offset, C.attrs.offset, C.numAttrs.offset,
           C.sharedMemBytes.offset, M.ATTR_PROGRAMMATIC_STREAM_SERIALIZATION]  # fmt: skip
    assert got == want


HARNESS = Path(__file__).with_name("int4_mma_host.cpp")


def _host_build(tmp_path: Path, p: M.Packed, cfg: M.Config, source: str) -> Path:
    """tests/int4_mma_host.cpp built with g++ around `source` for p's dtype and group size, once each."""
    defs = [f"-DQVLQ_BF16={int(p.dtype == torch.bfloat16)}"]
    defs += [f"-D{k}={v}" for k, v in M.defines(p.dtype, p.group_size, cfg).items()]
    exe = tmp_path / f"kernel-{hashlib.sha1((source + repr(defs)).encode()).hexdigest()[:12]}"
    if not exe.exists():
        (tmp_path / "kernel.cu").write_text(source)
        cmd = ["g++", "-std=c++20", "-O1", "-pthread", f"-I{tmp_path}", *defs, str(HARNESS), "-o", str(exe)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return exe


def host_dequantize(tmp_path: Path, p: M.Packed, out_f32: bool, source: str = M.SOURCE) -> torch.Tensor:
    """The CUDA source's qvlq_int4_dequant run on the host: W [N, K], fp32 or p's dtype."""
    exe = _host_build(tmp_path, p, M.DEFAULT_CONFIG, source)
    p.qweight.numpy().tofile(tmp_path / "qw.bin")
    p.meta.numpy().tofile(tmp_path / "meta.bin")
    n, k, g = p.out_features, p.in_features, p.meta.shape[1]
    args = [str(exe), "dequant", str(tmp_path), str(n), str(k), str(g), str(int(out_f32))]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = np.fromfile(tmp_path / "w.bin", dtype=np.float32 if out_f32 else np.int16)
    w = torch.from_numpy(raw)
    return (w if out_f32 else w.view(p.dtype)).reshape(n, k)


def host_kernel(tmp_path: Path, p: M.Packed, x: torch.Tensor, bias: torch.Tensor | None, cfg: M.Config,
                source: str = M.SOURCE, pad: int = 0, gamma: torch.Tensor | None = None, eps: float = 0.0,
                resid: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Run the CUDA source's kernel on the host (tests/int4_mma_host.cpp): y [M, N] in x's dtype. pad: extra
    NaN values after each row of x (a row stride ldx > K, as a view of a wider tensor has); gamma, eps: the
    norm prologue's; resid: the residual epilogue's."""
    exe = _host_build(tmp_path, p, cfg, source)
    p.qweight.numpy().tofile(tmp_path / "qw.bin")
    p.meta.numpy().tofile(tmp_path / "meta.bin")
    xp = torch.cat([x, torch.full((x.shape[0], pad), float("nan"), dtype=x.dtype)], dim=1)
    xp.contiguous().view(torch.int16).numpy().tofile(tmp_path / "x.bin")
    if bias is not None:
        bias.float().numpy().tofile(tmp_path / "bias.bin")
    for name, t in (("gamma", gamma), ("resid", resid)):
        if t is not None:
            t.contiguous().view(torch.int16).numpy().tofile(tmp_path / f"{name}.bin")
    n, k, g, m = p.out_features, p.in_features, p.meta.shape[1], x.shape[0]
    args = [str(exe), str(tmp_path), str(n), str(k), str(g), str(m), str(int(bias is not None)), str(k + pad)]
    args.append(repr(eps))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    y = torch.from_numpy(np.fromfile(tmp_path / "y.bin", dtype=np.int16))
    return y.view(p.dtype).reshape(m, n // 2 if cfg.glu else n)


def glu_reference(x: torch.Tensor, p: M.Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """What the glu epilogue must give: the two halves of the emulated product, then torch's eager swiglu."""
    return M.swiglu(*M.emulate(x, p, bias).chunk(2, dim=-1))


HOST_CASES = [  # (dtype, N, K, group, config, rows, bias, pad): warps without steps, groups across steps, TN 2
    (torch.bfloat16, 32, 768, 128, M.Config(8, 1), 2, True, 0),
    (torch.float16, 64, 512, 64, M.Config(4, 2), 1, False, 0),
    (torch.bfloat16, 16, 1024, 512, M.Config(16, 1), 1, True, 0),
    (torch.bfloat16, 32, 512, -1, M.Config(4, 1, fence=0), 1, False, 0),
    (torch.float16, 32, 1024, 256, M.Config(8, 2), 3, True, 8),
    # the cp.async ring: fewer steps than slots, groups of 64 with two tiles (64 metadata copies a step), a ring
    # that wraps, warps with uneven and with no steps, one group over all inputs
    (torch.bfloat16, 32, 1024, 128, M.Config(4, 1, 1, 3), 2, True, 0),
    (torch.float16, 64, 2048, 64, M.Config(4, 2, 1, 2), 1, False, 8),
    (torch.bfloat16, 16, 3072, 128, M.Config(2, 1, 1, 6), 1, True, 0),
    (torch.bfloat16, 32, 2560, 256, M.Config(8, 1, 1, 2), 3, False, 0),
    (torch.bfloat16, 16, 768, -1, M.Config(4, 1, 1, 4), 1, True, 0),
    # PDL: the register path peels its first step (weights before the wait, then x), warps without steps too
    (torch.bfloat16, 32, 768, 128, M.Config(8, 1, pdl=1), 2, True, 0),
    (torch.float16, 64, 1024, 64, M.Config(4, 2, fence=0, pdl=1), 1, False, 8),
    (torch.bfloat16, 32, 1024, 128, M.Config(4, 1, 1, 3, pdl=1), 2, True, 0),
    (torch.bfloat16, 16, 3072, 128, M.Config(2, 1, 1, 6, pdl=1), 1, True, 0),
    (torch.float16, 64, 2048, 64, M.Config(4, 2, 1, 2, pdl=1), 1, False, 8),
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("case", HOST_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}-g{c[3]}-{c[4].name}-m{c[5]}")
def test_cuda_source_on_the_host_matches_reference(tmp_path, case):
    dtype, n, k, gs, cfg, rows, with_bias, pad = case
    p, _ = random_packed(n, k, gs, dtype, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(5)).to(dtype)
    bias = torch.randn(n) if with_bias else None
    y = host_kernel(tmp_path, p, x, bias, cfg, pad=pad)
    assert mismatch(y, M.reference(x.float(), p, bias)) is None
    assert torch.equal(y, M.emulate(x, p, bias)) or mismatch(y, M.emulate(x, p, bias).float()) is None


GLU_CASES = [  # (dtype, N (both halves), K, group, config, rows, bias): registers, two tiles, the ring
    (torch.bfloat16, 64, 768, 128, M.Config(8, 1, glu=1), 2, True),
    (torch.float16, 128, 512, 64, M.Config(4, 2, glu=1), 1, False),
    (torch.bfloat16, 64, 1024, 128, M.Config(4, 1, 1, 2, glu=1), 3, False),
    (torch.float16, 96, 2048, 256, M.Config(2, 1, 1, 4, glu=1), 1, True),
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("case", GLU_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}-g{c[3]}-{c[4].name}-m{c[5]}")
def test_glu_epilogue_on_the_host_matches_torch(tmp_path, case):
    """The kernel with glu: a * silu(b) of the two stacked layers, as torch's eager ops compute it from the
    separate outputs (to the last bit but where the two libms' expf differ; never more than one rounding)."""
    dtype, n, k, gs, cfg, rows, with_bias = case
    p, _ = random_packed(n, k, gs, dtype, seed=n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(8)).to(dtype)
    bias = torch.randn(n) if with_bias else None
    want = glu_reference(x, p, bias)
    y = host_kernel(tmp_path, p, x, bias, cfg)
    assert y.shape == (rows, n // 2) and mismatch(y, want.float()) is None
    assert (y != want).float().mean() < 0.01
    assert torch.equal(M.gemv(x, p, bias, cfg), want)  # the CPU op: emulate, then torch's swiglu
    bug = M.SOURCE.replace("bias[half * 16 + n]", "bias[n]")  # b's bias taken from a
    if not with_bias:
        bug = M.SOURCE.replace(" + (warp / WH) * half", "")  # b's tiles taken from a
    assert bug != M.SOURCE
    assert mismatch(host_kernel(tmp_path, p, x, bias, cfg, source=bug), want.float()) is not None


FUSED_CASES = [  # (dtype, N, K, group, config, rows): the norm prologue (registers, the ring, glu), the residual add
    (torch.bfloat16, 32, 1024, 128, M.Config(4, 1, norm=1024), 2),
    (torch.float16, 64, 512, 64, M.Config(2, 2, norm=512), 1),
    (torch.bfloat16, 32, 2048, 128, M.Config(2, 1, 1, 4, norm=2048), 1),
    (torch.bfloat16, 64, 768, 128, M.Config(4, 1, glu=1, norm=768), 3),
    (torch.bfloat16, 48, 512, 128, M.Config(8, 1, resid=1), 2),
    (torch.float16, 32, 1024, 256, M.Config(4, 2, 1, 2, resid=1), 1),
    (torch.bfloat16, 32, 1024, 128, M.Config(4, 1, norm=1024, pdl=1), 2),
    (torch.bfloat16, 64, 2048, 128, M.Config(2, 1, 1, 4, glu=1, norm=2048, pdl=1), 1),
    (torch.bfloat16, 48, 512, 128, M.Config(8, 1, resid=1, pdl=1), 2),
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[1]}x{c[2]}-{c[4].name}-m{c[5]}")
def test_norm_prologue_and_residual_epilogue_on_the_host(tmp_path, case):
    """norm: the block normalizes its row of the residual stream as the model's RMSNorm does, then the product;
    resid: the residual add on the rounded product. Against the CPU op (the model's ops around the kernel's
    lane model): equal but for the order of the fp32 sum of squares and rsqrt's rounding, never more than one
    rounding off; and a kernel that skips gamma, or reads the unnormalized x, is caught."""
    dtype, n, k, gs, cfg, rows = case
    p, _ = random_packed(n, k, gs, dtype, seed=n + k)
    gen = torch.Generator().manual_seed(9)
    x = (3 * torch.randn(rows, k, generator=gen)).to(dtype)
    n_out = n // 2 if cfg.glu else n
    gamma = (1 + 0.5 * torch.randn(k, generator=gen)).to(dtype) if cfg.norm else None
    resid = torch.randn(rows, n_out, generator=gen).to(dtype) if cfg.resid else None
    eps = 1e-6 if cfg.norm else 0.0
    want = M.gemv(x, p, None, cfg, gamma, eps, resid)
    unfused = M.emulate(M.rms_norm(x, gamma, eps) if cfg.norm else x, p)
    unfused = M.swiglu(*unfused.chunk(2, -1)) if cfg.glu else unfused
    assert torch.equal(want, resid + unfused if cfg.resid else unfused)  # the CPU op is the model's composition
    y = host_kernel(tmp_path, p, x, None, cfg, gamma=gamma, eps=eps, resid=resid)
    assert y.shape == (rows, n_out) and mismatch(y, want.float()) is None
    assert (y != want).float().mean() < 0.05
    bugs = [("norm2(v.x, g.x, r)", "norm2(v.x, 0x3F803F80u, r)"), ("const u4* xp = xs + tq * 2;", "const u4* xp = "
            "reinterpret_cast<const u4*>(x + (u64)m * ldx) + tq * 2;")] if cfg.norm and not cfg.stages else []
    bugs += [("act_to_float(resid[(u64)m * ldr + n]) + ", "")] if cfg.resid else []
    for old, new in bugs:
        assert old in M.SOURCE
        source = M.SOURCE.replace(old, new)
        bad = host_kernel(tmp_path, p, x, None, cfg, source=source, gamma=gamma, eps=eps, resid=resid)
        assert mismatch(bad, want.float()) is not None, old


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_host_build_notices_a_kernel_bug(tmp_path):
    p, _ = random_packed(16, 512, 128, torch.bfloat16)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    bug = M.SOURCE.replace("b[2 * j], b[2 * j + 1]", "b[2 * j + 1], b[2 * j]")
    assert bug != M.SOURCE
    y = host_kernel(tmp_path, p, x, None, M.DEFAULT_CONFIG, source=bug)
    assert mismatch(y, M.reference(x.float(), p)) is not None


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
@pytest.mark.parametrize("dtype,n,k,gs", [(torch.bfloat16, 32, 512, 128), (torch.float16, 16, 768, 64),
                                          (torch.bfloat16, 16, 1024, -1), (torch.float16, 48, 512, 256)])  # fmt: skip
def test_dequantize_kernel_on_the_host_is_bit_exact(tmp_path, dtype, n, k, gs):
    """The prefill path's kernel gives dequantize_torch's values bit for bit, in fp32 and in p's dtype."""
    p, _ = random_packed(n, k, gs, dtype, seed=n + k)
    for out_f32, want in ((True, torch.float32), (False, dtype)):
        got = host_dequantize(tmp_path, p, out_f32)
        assert got.dtype == want and torch.equal(got, M.dequantize_torch(p, want).T.contiguous())
    assert torch.equal(M.dequantize(p, dtype), M.dequantize_torch(p, dtype))  # CPU: the torch path
    bug = M.SOURCE.replace("{h, h + 4, h + 2, h + 6}", "{h, h + 2, h + 4, h + 6}")
    assert bug != M.SOURCE
    assert not torch.equal(host_dequantize(tmp_path, p, True, source=bug), M.dequantize_torch(p).T)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_host_build_notices_a_ring_read_before_its_copies_land(tmp_path):
    p, _ = random_packed(16, 2048, 128, torch.bfloat16)
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    cfg = M.Config(2, 1, 1, 3)
    assert mismatch(host_kernel(tmp_path, p, x, None, cfg), M.reference(x.float(), p)) is None
    bug = M.SOURCE.replace("cp_async_wait<STAGES - 1>();", "cp_async_wait<STAGES>();")
    assert bug != M.SOURCE
    assert mismatch(host_kernel(tmp_path, p, x, None, cfg, source=bug), M.reference(x.float(), p)) is not None
    # PDL: the prologue's x copies after the wait, one commit group each; in one group they would land late
    pdl = M.Config(2, 1, 1, 4, pdl=1)
    assert mismatch(host_kernel(tmp_path, p, x, None, pdl), M.reference(x.float(), p)) is None
    x_loop = "if (k < n) cp_async16(&ring[k].x[lane], &xrow[(s0 + k) * 32 + lane]);\n    cp_async_commit();\n  }"
    assert x_loop in M.SOURCE
    bug = M.SOURCE.replace(x_loop, "if (k < n) cp_async16(&ring[k].x[lane], &xrow[(s0 + k) * 32 + lane]);\n  }\n"
                                   "  cp_async_commit();")  # fmt: skip
    assert mismatch(host_kernel(tmp_path, p, x, None, pdl, source=bug), M.reference(x.float(), p)) is not None


def test_ring_configs_fit_static_shared_memory():
    ring = [c for c in M.CONFIGS if c.stages]
    assert ring and all(c.stages >= 2 for c in ring)
    for gs in (64, 128, 256, -1):
        for c in ring:
            assert c.shared_bytes(4096 if gs == -1 else gs) <= M.SHARED_LIMIT, (c.name, gs)
    assert len({c.name for c in M.CONFIGS}) == len(M.CONFIGS)


def test_layout_probe_is_clean_for_the_model_and_names_misplaced_weights():
    assert M.layout_probe(lambda x, p: M.emulate(x, p)) == []
    assert M.layout_probe(lambda x, p: M.emulate(x, p), 16, 256, 64, torch.float16) == []

    def swapped_words(x, p):
        q = p.qweight.clone()
        q[..., [0, 1]] = q[..., [1, 0]]
        return M.emulate(x, p._replace(qweight=q))

    findings = M.layout_probe(swapped_words)
    assert findings[0] == "8192 of 16384 weights use the wrong code"
    want = "  row 0 input 0: code of input 4 instead of 0 (lane 0 word 0 nibble 0 -> lane 0 word 1 nibble 0)"
    assert want in findings


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")
def test_layout_probe_on_the_host_build(tmp_path):
    """The probe as benchmarks/mma_diagnose.py runs it on a GPU, here on the host build of the CUDA source."""
    cfg = M.Config(4, 1)
    assert M.layout_probe(lambda x, p: host_kernel(tmp_path, p, x, None, cfg), 16, 256) == []
    bug = M.SOURCE.replace("(p & 1) ? z1 : z0", "(p & 1) ? z0 : z1")
    assert bug != M.SOURCE
    findings = M.layout_probe(lambda x, p: host_kernel(tmp_path, p, x, None, cfg, source=bug), 16, 256)
    assert findings and findings[0] == "4096 of 4096 weights use the wrong zero", findings  # rows g <-> g+8
    assert findings[1] == "  row 0 input 0: zero of row 8 instead of 0"


def _nvrtc_error() -> str | None:
    try:
        M._nvrtc()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.skipif(_nvrtc_error() is not None, reason=f"libnvrtc not found: {_nvrtc_error()}")
def test_nvrtc_path_compiles_and_reports_errors(monkeypatch):
    for cfg in M.CONFIGS:
        cubin = M.compile_cubin("sm_90", M.defines(torch.bfloat16, 128, cfg))
        assert cubin[:4] == b"\x7fELF"
    monkeypatch.setattr(M, "SOURCE", M.SOURCE.replace("acc[t][0] +=", "undeclared[t][0] +=", 1))
    with pytest.raises(RuntimeError, match="undeclared"):
        M.compile_cubin("sm_80", M.defines(torch.float16, 64, M.DEFAULT_CONFIG))


def test_missing_nvrtc_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(M, "_candidates", lambda: ["/nonexistent/libnvrtc.so"])
    M._nvrtc.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=M.ENV_NVRTC):
            M._nvrtc()
    finally:
        M._nvrtc.cache_clear()


@pytest.fixture
def fake_nvrtc(monkeypatch, tmp_path):
    """cubin() over a counting stand-in for NVRTC, its disk cache in tmp_path; the memory cache cleared around."""
    calls: list[tuple[str, str]] = []

    def compile_cubin(arch: str, defs: dict[str, str]) -> bytes:
        calls.append((arch, defs["WARPS"]))
        if defs["WARPS"] == "16":
            raise RuntimeError("NVRTC compile: planted error")
        return M.ELF_MAGIC + repr((arch, sorted(defs.items()))).encode()

    monkeypatch.setattr(M, "compile_cubin", compile_cubin)
    monkeypatch.setattr(M, "nvrtc_version", lambda: "13.0")
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(tmp_path / "cache"))
    M.cubin.cache_clear()
    yield calls
    M.cubin.cache_clear()


def test_cubin_is_compiled_once_and_reused_from_disk(fake_nvrtc, monkeypatch, tmp_path):
    bf16, cfg = torch.bfloat16, M.DEFAULT_CONFIG
    first = M.cubin("sm_90", bf16, 128, cfg)
    assert M.cubin("sm_90", bf16, 128, cfg) == first and len(fake_nvrtc) == 1  # memory
    files = list((tmp_path / "cache" / "int4_mma").glob("sm_90-*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first
    M.cubin.cache_clear()  # a new process
    assert M.cubin("sm_90", bf16, 128, cfg) == first and len(fake_nvrtc) == 1  # disk

    # anything the CUBIN depends on is in the key: config, dtype, group, arch, NVRTC version, source
    for args in (("sm_90", bf16, 128, M.CONFIGS[0]), ("sm_90", torch.float16, 128, cfg), ("sm_90", bf16, 64, cfg),
                 ("sm_80", bf16, 128, cfg)):  # fmt: skip
        M.cubin(*args)
    assert len(fake_nvrtc) == 5
    M.cubin.cache_clear()
    monkeypatch.setattr(M, "nvrtc_version", lambda: "13.1")
    M.cubin("sm_90", bf16, 128, cfg)
    monkeypatch.setattr(M, "SOURCE", M.SOURCE + "\n// changed\n")
    M.cubin.cache_clear()
    M.cubin("sm_90", bf16, 128, cfg)
    assert len(fake_nvrtc) == 7 and len(list((tmp_path / "cache" / "int4_mma").iterdir())) == 7

    # a damaged file is rebuilt and replaced; no temporary files stay behind
    monkeypatch.undo()
    monkeypatch.setattr(M, "compile_cubin", lambda arch, defs: M.ELF_MAGIC + b"rebuilt")
    monkeypatch.setattr(M, "nvrtc_version", lambda: "13.0")
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(tmp_path / "cache"))
    files[0].write_bytes(b"trunc")
    M.cubin.cache_clear()
    assert M.cubin("sm_90", bf16, 128, cfg) == M.ELF_MAGIC + b"rebuilt" == files[0].read_bytes()
    assert not [f for f in (tmp_path / "cache" / "int4_mma").iterdir() if f.name.startswith(".")]


def test_cubin_without_a_usable_cache_still_compiles(fake_nvrtc, monkeypatch, tmp_path):
    monkeypatch.setenv("QVLQ_CACHE_DIR", "off")
    assert M.cache_path("sm_90", {}) is None
    assert M.cubin("sm_90", torch.bfloat16, 128, M.DEFAULT_CONFIG)[:4] == M.ELF_MAGIC
    assert not (tmp_path / "cache").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(blocker))  # the cache directory cannot be made: compile anyway
    M.cubin.cache_clear()
    assert M.cubin("sm_90", torch.bfloat16, 128, M.DEFAULT_CONFIG)[:4] == M.ELF_MAGIC
    assert len(fake_nvrtc) == 2


def test_precompile_builds_each_config_once_and_leaves_errors_to_the_tuner(fake_nvrtc, monkeypatch):
    monkeypatch.setattr(M, "_capability", lambda index: (9, 0))
    configs = M.CONFIGS + M.PDL_CONFIGS
    M.precompile(0, torch.bfloat16, 128, configs, workers=4)
    failing = [c for c in configs if c.warps == 16]
    assert failing and len(fake_nvrtc) == len(configs) and {a for a, _ in fake_nvrtc} == {"sm_90"}
    assert M.cubin.cache_info().currsize == len(configs) - len(failing)  # errors are not cached: met again later
    with pytest.raises(RuntimeError, match="planted"):
        M.cubin("sm_90", torch.bfloat16, 128, failing[0])


@pytest.mark.skipif(_nvrtc_error() is not None, reason=f"libnvrtc not found: {_nvrtc_error()}")
def test_precompiled_cubins_are_nvrtcs_own(monkeypatch, tmp_path):
    """Threads give the bytes one compile gives (the module loads what the tuner timed)."""
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(M, "_capability", lambda index: (9, 0))
    M.cubin.cache_clear()
    try:
        configs = [M.CONFIGS[0], M.PDL_CONFIGS[3], M.variant(M.DEFAULT_CONFIG, 128, norm=4096, glu=1)]
        M.precompile(0, torch.float16, 128, configs, workers=3)
        for cfg in configs:
            want = M.compile_cubin("sm_90", M.defines(torch.float16, 128, cfg))
            assert M.cubin("sm_90", torch.float16, 128, cfg) == want
            assert M.cache_path("sm_90", M.defines(torch.float16, 128, cfg)).read_bytes() == want
    finally:
        M.cubin.cache_clear()


# ------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.skipif(not HAS_CUDA or M.runtime_error() is not None, reason="needs CUDA, libnvrtc and libcuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "out_in", [(4096, 4096), (12288, 4096), (11008, 4096), (4096, 11008)], ids=["c_proj", "c_attn", "w1", "mlp.c_proj"]
)
def test_full_size_kernel_matches_reference(out_in):
    n, k = out_in
    for dtype in (torch.bfloat16, torch.float16):
        p, _ = random_packed(n, k, 128, dtype, seed=4, device="cuda")
        bias = torch.randn(n, device="cuda")
        for rows in (1, 3):
            x = torch.randn(rows, k, device="cuda").to(dtype)
            ref = M.reference(x.float(), p, bias)
            for cfg in M.configs_for(x.device):  # with the PDL launches on sm_90+
                bad = mismatch(M.gemv(x, p, bias, cfg), ref)
                assert bad is None, f"{cfg.name} {dtype} rows={rows}: {bad}"
    res = M.tuned(p)
    assert res.best.name in res.seconds and not res.dropped, res.dropped
    # the lean prefill path's dense weight: little transient memory beyond the result (2 bytes a weight)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    w = M.dequantize(p, torch.bfloat16)
    extra = torch.cuda.max_memory_allocated() - base - w.numel() * 2
    assert extra < 2.5 * w.numel(), f"{extra / w.numel():.2f} transient bytes per weight"
    assert torch.equal(w, M.dequantize_torch(p, torch.bfloat16))  # the dequantize kernel, bit for bit
    assert torch.equal(M.dequantize(p), M.dequantize_torch(p))


@pytest.mark.gpu
@gpu
def test_quantlinear_mma_in_compiled_graph_and_fastest():
    from qvlq import int4

    lin = gptq_linear(out=256, inp=512, group_size=128, desc_act=True).cuda().prepare("mma")
    assert lin.backend == "mma"
    w = lin.dequantize().T
    x = torch.randn(1, 1, 512, device="cuda", dtype=torch.bfloat16)
    eager = lin(x)
    assert mismatch(eager[0], x[0].float() @ w + lin.bias.float()) is None
    step = torch.compile(lin, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        torch.compiler.cudagraph_mark_step_begin()
        got = step(x).clone()
    assert torch.equal(got, eager)  # fixed reduction order: bit-identical
    fast = random_linear(4096, 4096, seed=5).cuda().prepare("fastest")
    rec = [r for r in int4.fastest_choices() if (r["out_features"], r["in_features"]) == (4096, 4096)]
    assert rec and rec[0]["choice"] == fast.backend and rec[0].get("mma_us", 0) > 0, rec


@pytest.mark.gpu
@gpu
def test_norm_prologue_and_residual_epilogue_at_full_size():
    """The norm and resid blocks of the configs the tuners chose on the H100 and H200 (and a two-tile one) on the
    decode step's shapes, against the model's ops around the plain kernel: the residual add bit for bit, the
    norm up to its fp32 sum order and rsqrt. (Every config compiles without spills: the nvcc test.)"""
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = (3 * torch.randn(1, 4096, device="cuda", generator=gen)).bfloat16()
    gamma = (1 + 0.3 * torch.randn(4096, device="cuda", generator=gen)).bfloat16()
    for n, k, flags in ((12288, 4096, dict(norm=4096)), (22016, 4096, dict(norm=4096, glu=1)),
                        (4096, 4096, dict(resid=1)), (4096, 11008, dict(resid=1))):  # fmt: skip
        p, _ = random_packed(n, k, 128, torch.bfloat16, seed=n, device="cuda")
        xi = x if k == 4096 else torch.randn(1, k, device="cuda", generator=gen).bfloat16()
        resid = torch.randn(1, n, device="cuda", generator=gen).bfloat16() if flags.get("resid") else None
        for cfg in (M.Config(4, 1), M.Config(8, 1), M.Config(4, 2), M.Config(4, 1, 1, 3), M.Config(8, 1, 1, 2)):
            v = M.variant(cfg, 128, **flags)
            if v is None:
                continue
            got = M.gemv(xi, p, None, v, gamma if v.norm else None, 1e-6, resid)
            want = M.gemv(M.rms_norm(xi, gamma, 1e-6) if v.norm else xi, p, None, cfg)
            want = M.swiglu(*want.chunk(2, -1)) if v.glu else want
            if v.resid:
                assert torch.equal(got, resid + want), v.name
            else:
                assert rel_error(got, want) < 1e-2 and (got != want).float().mean() < 0.05, v.name


@pytest.mark.gpu
@gpu
def test_pdl_launches_in_a_dependent_chain_match_plain_launches():
    """PDL launches where each reads what the launch before it wrote, as in the decode step: x -> norm launch ->
    h -> resid launch (h and x) -> x ..., eager and captured in one CUDA graph (where the launches become
    programmatic edges). The kernel is deterministic, so the chain must equal the plain launches' bit for bit:
    a block that read its input, or wrote its output, before the previous kernel ended would break that."""
    if torch.cuda.get_device_capability() < M.PDL_CAPABILITY:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    p, _ = random_packed(4096, 4096, 128, torch.bfloat16, seed=9, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(9)
    x0 = torch.randn(1, 4096, device="cuda", generator=gen).bfloat16()
    gamma = (1 + 0.1 * torch.randn(4096, device="cuda", generator=gen)).bfloat16()

    def chain(pdl: int) -> torch.Tensor:
        norm, res = M.Config(4, 1, norm=4096, pdl=pdl), M.Config(8, 1, 1, 2, resid=1, pdl=pdl)  # registers, ring
        x = x0
        for _ in range(24):
            h = M.gemv(x, p, None, norm, gamma, 1e-6)
            x = M.gemv(h, p, None, res, None, 0.0, x)
        return x

    want = chain(0)
    assert bool(torch.isfinite(want).all()) and torch.equal(chain(1), want)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(1)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        got = chain(1)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)


@pytest.mark.gpu
@gpu
def test_variant_tuner_at_full_size():
    """tuned_variant on the decode step's fused launches: every candidate that fits a block compiles, agrees
    with its plain config and is timed; the winner is one of them and is recorded for the reports."""
    for n, k, flags in ((12288, 4096, dict(norm=4096)), (22016, 4096, dict(norm=4096, glu=1)),
                        (4096, 11008, dict(resid=1))):  # fmt: skip
        p, _ = random_packed(n, k, 128, torch.bfloat16, seed=n, device="cuda")
        res = M.tuned_variant(p, None, flags, M.Config(4, 1), p)
        assert res.best.name in res.seconds and all("threads" in why for why in res.dropped.values()), res.dropped
        assert (res.best.glu, res.best.norm, res.best.resid) == (flags.get("glu", 0), flags.get("norm", 0),
                                                                 flags.get("resid", 0))  # fmt: skip
    assert {r["variant"] for r in M.variant_selection()} >= {"norm", "norm-glu", "res"}


@pytest.mark.gpu
@gpu
def test_glu_check_holds_the_kernel_to_its_own_configs_sums():
    """check_glu compares the glu kernel with torch's gate on the pair of the glu block's own plain config. With
    the layers on another config (another K split, so a and b rounded from other fp32 sums), comparing with
    their pair failed 3 of 32 full-size layers on an H100 by one rounding (2026-11-27)."""
    from qvlq import int4

    w1, w2 = (random_linear(11008, 4096, seed=s).cuda().prepare("mma") for s in (8, 9))
    for w in (w1, w2):
        w._cache["mcfg"] = M.Config(2, 1, stages=6)  # the H100 tuner's pick for this shape
    fused = int4.fuse_mma(w1, w2)
    assert fused is not None
    fused.glu, fused.glu_error = M.Config(8, 1, fence=0, glu=1), None  # the H100's glu pick: 8 warps a half
    assert [fused.check_glu(seed) for seed in range(24)] == [None] * 24
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    a, b = fused.pair(x, M.Config(8, 1, fence=0))
    assert mismatch(fused(x), (a * torch.nn.functional.silu(b)).float()) is None


@pytest.mark.gpu
@gpu
def test_fused_w1_w2_on_cuda_is_bit_identical():
    """The decode step's mlp.w1 + mlp.w2 as one GEMV at full size, eager and inside a compiled graph: the two
    outputs bit for bit, the gate from the glu kernel as torch's ops on them, up to expf."""
    from qvlq import int4

    w1, w2 = (random_linear(11008, 4096, seed=s).cuda().prepare("mma") for s in (6, 7))
    for w in (w1, w2):  # a config with a glu block, whatever this GPU's tuner chose
        w._cache["mcfg"] = M.Config(4, 1)
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    want = (w1(x), w2(x))
    gate = want[0] * torch.nn.functional.silu(want[1])
    fused = int4.fuse_mma(w1, w2)
    assert fused is not None and all(torch.equal(f, w) for f, w in zip(fused.pair(x), want, strict=True))
    assert fused.glu is not None and fused.glu.glu, fused.glu_error  # the variant tuner's, checked at build
    assert [r for r in M.variant_selection() if r["variant"] == "glu" and r["out_features"] == 22016]
    assert mismatch(fused(x), gate.float()) is None and (fused(x) != gate).float().mean() < 0.01
    step = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        got = step(x).clone()
    assert torch.equal(got, fused(x))
    p = M.Packed(fused.qweight, fused.meta, 128, torch.bfloat16)
    for cfg in (M.Config(8, 1), M.Config(4, 2), M.Config(4, 1, 1, 2)):  # other glu blocks vs torch's gate on their pair
        glu = M.variant(cfg, 128, glu=1)
        if glu is not None:
            own = M.swiglu(*M.gemv(x, p, None, cfg).chunk(2, dim=-1))
            got = M.gemv(x, p, None, glu)
            assert mismatch(got, own.float()) is None and (got != own).float().mean() < 0.01, glu.name
    assert torch.equal(w1(x), want[0]) and torch.equal(w2(x), want[1])
