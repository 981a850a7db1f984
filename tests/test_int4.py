import pytest
import torch

from qvlq.gptq import GPTQ, QuantSpec
from qvlq.int4 import (
    QuantLinear,
    dequantize_gptq_v1,
    pack_gptq_v1,
    pack_rows,
    quantized_state_dict_entries,
    unpack_gptq_v1,
    unpack_rows,
)

SYM_4BIT_QZERO = 0x77777777  # == 2004318071


def random_layer(out: int, inp: int, bits: int = 4, group_size: int = 128, sym: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n_groups = inp // group_size
    codes = torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n_groups, out, generator=g) * 0.02 + 1e-3).half().float()
    if sym:
        zeros = torch.full((n_groups, out), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zeros = torch.randint(1, 2**bits + 1, (n_groups, out), generator=g, dtype=torch.int32)
    g_idx = torch.arange(inp, dtype=torch.int32) // group_size
    return codes, scales, zeros, g_idx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(32, 64), (64, 256), (96, 384)])
def test_pack_unpack_round_trip(bits, shape):
    out, inp = shape
    codes, scales, zeros, g_idx = random_layer(out, inp, bits, 32, sym=False, seed=bits)
    p = pack_gptq_v1(codes, scales, zeros, g_idx, bits)
    assert p["qweight"].dtype == torch.int32 and p["qweight"].shape == (inp * bits // 32, out)
    assert p["qzeros"].dtype == torch.int32 and p["qzeros"].shape == (inp // 32, out * bits // 32)
    assert p["scales"].dtype == torch.float16 and p["g_idx"].dtype == torch.int32
    c2, z2, s2 = unpack_gptq_v1(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], bits)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, scales)


def test_4bit_layout_and_sign():
    codes = torch.zeros(16, 8, dtype=torch.uint8)  # [out, in]
    codes[3] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0xF])  # in-columns 0..7 of output 3
    p = pack_rows(codes.T, 4)  # qweight [1, 16]
    assert p.shape == (1, 16)
    # qweight[r, o] holds code[o, 8r + j] at bits 4j..4j+3; top nibble 0xF makes the int32 negative
    assert int(p[0, 3]) == 0xF7654321 - 2**32
    assert torch.equal(unpack_rows(p, 4), codes.T.long())


def test_3bit_layout_is_a_bit_stream():
    v = torch.zeros(32, 1, dtype=torch.int64)
    v[10, 0] = 0b101  # bits 30..32: straddles words 0 and 1
    v[21, 0] = 0b011  # bits 63..65: straddles words 1 and 2
    p = pack_rows(v, 3).long() & 0xFFFFFFFF
    assert p.shape == (3, 1)
    assert p[:, 0].tolist() == [0b01 << 30, (0b1 << 0) | (0b1 << 31), 0b01]
    assert torch.equal(unpack_rows(pack_rows(v, 3), 3), v)


def test_sym_qzeros_words():
    codes, scales, zeros, g_idx = random_layer(64, 256)
    p = pack_gptq_v1(codes, scales, zeros, g_idx, 4)
    assert torch.all(p["qzeros"] == SYM_4BIT_QZERO) and SYM_4BIT_QZERO == 2004318071


def test_v1_cannot_hold_zero_point_zero():
    codes, scales, zeros, g_idx = random_layer(32, 64, group_size=32)
    zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero points"):
        pack_gptq_v1(codes, scales, zeros, g_idx, 4)


def test_dequant_formula():
    codes, scales, zeros, g_idx = random_layer(32, 256, sym=False)
    p = pack_gptq_v1(codes, scales, zeros, g_idx, 4)
    w = dequantize_gptq_v1(p["qweight"], p["qzeros"], p["scales"], p["g_idx"], 4)
    zs = ((p["qzeros"].long() & 0xFFFFFFFF) >> (4 * (5 % 8))) & 0xF  # z_stored for outputs 5, 13, ...
    o, i = 5, 200
    g = int(g_idx[i])
    assert float(w[o, i]) == float(scales[g, o]) * (int(codes[o, i]) - (int(zs[g, o // 8]) + 1))


def quantized_linear(out=64, inp=256, group_size=128, desc_act=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    q = GPTQ((out, inp))
    q.add_batch(torch.randn(512, inp, generator=g))
    spec = QuantSpec(group_size=group_size, desc_act=desc_act)
    return q.quantize(w, spec), torch.randn(out, generator=g)


def test_state_dict_entries_and_loading():
    r, bias = quantized_linear()
    for b in (bias, None):
        sd = quantized_state_dict_entries("transformer.h.0.attn.c_attn", r, b)
        expect = {
            "qweight": (torch.int32, (32, 64)),
            "qzeros": (torch.int32, (2, 8)),
            "scales": (torch.float16, (2, 64)),
            "g_idx": (torch.int32, (256,)),
            "bias": (torch.float16, (64,)),
        }
        assert list(sd) == [f"transformer.h.0.attn.c_attn.{k}" for k in expect]
        for k, (dt, shape) in expect.items():
            t = sd[f"transformer.h.0.attn.c_attn.{k}"]
            assert t.dtype == dt and tuple(t.shape) == shape, k
        lin = QuantLinear(256, 64)
        assert set(lin.state_dict()) == set(expect)
        lin.load_state_dict({k.rsplit(".", 1)[1]: v for k, v in sd.items()})
        x = torch.randn(2, 3, 256)
        ref = x @ r.dequant().T + (0 if b is None else b.half().float())
        torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-4)
    assert torch.all(quantized_state_dict_entries("m", r)["m.bias"] == 0)


@pytest.mark.parametrize("group_size, desc_act", [(128, False), (32, False), (256, False), (-1, False), (64, True)])
def test_cpu_int4_backend_matches_dequant(group_size, desc_act):
    r, bias = quantized_linear(group_size=group_size, desc_act=desc_act)
    lin = QuantLinear.from_result(r, bias)
    assert lin.backend == "unprepared"
    assert lin.prepare().backend == "dequant"  # auto on CPU
    lin.prepare("int4_cpu")
    assert lin.backend == "int4_cpu"
    ref_lin = QuantLinear.from_result(r, bias).prepare("dequant")
    x = torch.randn(5, 7, 256)
    # fp32: both exact up to summation order
    torch.testing.assert_close(lin(x), ref_lin(x), rtol=1e-5, atol=1e-4)
    # bf16 activations: kernels round scales and partial sums to bf16; relative to the output scale
    xb = x.bfloat16()
    y, ref = lin(xb).float(), ref_lin(xb).float()
    assert lin(xb).dtype == torch.bfloat16
    assert (y - ref).abs().max() < 2e-2 * ref.abs().max()


def test_module_dtype_casts_keep_fp16_scales():
    r, bias = quantized_linear()
    lin = QuantLinear.from_result(r, bias).prepare("dequant")
    lin.to(torch.bfloat16)
    assert lin.scales.dtype == torch.float16 and lin.bias.dtype == torch.float16
    assert lin.backend == "unprepared"  # caches dropped, rebuilt at the next call
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), x @ r.dequant().T + bias.half().float(), rtol=1e-5, atol=1e-4)


def test_unknown_or_unusable_backend():
    r, _ = quantized_linear()
    with pytest.raises(ValueError, match="unknown backend"):
        QuantLinear.from_result(r).prepare("fast")
    with pytest.raises(ValueError, match="int4_cuda needs the layer on a CUDA device"):
        QuantLinear.from_result(r).prepare("int4_cuda")  # the layer is on the CPU
    r3 = GPTQ((64, 256))
    r3.add_batch(torch.randn(64, 256))
    lin3 = QuantLinear.from_result(r3.quantize(torch.randn(64, 256), QuantSpec(bits=3, group_size=128)))
    assert lin3.prepare().backend == "dequant"  # auto falls back where no kernel applies
    with pytest.raises(ValueError, match="bits=4"):
        lin3.prepare("int4_cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("desc_act", [False, True])
def test_cuda_int4_backend_matches_dequant(desc_act):
    r, bias = quantized_linear(out=128, inp=512, desc_act=desc_act)
    lin = QuantLinear.from_result(r, bias).cuda().prepare()
    assert lin.backend == "int4_cuda"
    ref_lin = QuantLinear.from_result(r, bias).cuda().prepare("dequant")
    x = torch.randn(4, 9, 512, device="cuda", dtype=torch.bfloat16)
    y, ref = lin(x).float(), ref_lin(x.float())
    assert lin(x).dtype == torch.bfloat16
    assert (y - ref).abs().max() < 2e-2 * ref.abs().max()
    y16 = lin(x.half())  # fp16 activations go through bf16 inside
    assert y16.dtype == torch.float16 and (y16.float() - ref).abs().max() < 2e-2 * ref.abs().max()
    lin.dequant_rows = 8  # the per-call dense path used for long prompts
    y = lin(x).float()
    assert (y - ref).abs().max() < 2e-2 * ref.abs().max()


def test_load_with_assign_keeps_format_dtypes():
    r, bias = quantized_linear()
    sd = {k.split(".", 1)[1]: v for k, v in quantized_state_dict_entries("m", r, bias).items()}
    sd["bias"] = sd["bias"].float()
    lin = QuantLinear(256, 64, device="meta")
    lin.load_state_dict(sd, assign=True)
    assert lin.bias.dtype == torch.float16 and lin.qweight.device.type == "cpu"
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), x @ r.dequant().T + bias.half().float(), rtol=1e-5, atol=1e-4)


def test_large_batches_dequantize_per_call():
    for desc_act in (False, True):
        r, bias = quantized_linear(desc_act=desc_act)
        lin = QuantLinear.from_result(r, bias).prepare("int4_cpu")
        x = torch.randn(2, 9, 256)
        small = lin(x)
        lin.dequant_rows = 16  # 18 rows: the dense path
        torch.testing.assert_close(lin(x), small, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lin(x), x @ r.dequant().T + bias.half().float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["dequant", "int4_cpu"])
def test_bias_applied_and_zero_bias_skipped(backend):
    r, bias = quantized_linear()
    w = r.dequant()
    x = torch.randn(3, 256)
    for b in (bias, torch.zeros_like(bias)):
        lin = QuantLinear.from_result(r, b).prepare(backend)
        torch.testing.assert_close(lin(x), x @ w.T + b.half().float(), rtol=1e-5, atol=1e-4)
        assert (lin._bias(torch.float32) is None) == (not bool(b.any()))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])  # fmt: skip
def test_lean_prepare_keeps_one_weight_copy_on_the_device(device):
    """lean: the v1 buffers (qweight, qzeros, scales, g_idx) go to host memory, the kernel's copy
    serves every call (no dense prefill path), and state_dict() still returns the checkpoint tensors."""
    r, bias = quantized_linear(out=128, inp=512, desc_act=True)
    backend = "int4_cpu" if device == "cpu" else "int4_cuda"
    full = QuantLinear.from_result(r, bias).to(device).prepare(backend)
    lean = QuantLinear.from_result(r, bias).to(device).prepare(backend, lean=True)
    sd = {k: v.cpu() for k, v in full.state_dict().items()}
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert getattr(lean, name).device.type == "cpu", name
    assert lean.bias.device.type == device and lean.dequant_rows is None
    if backend == "int4_cuda":
        assert "sz32" not in lean._cache  # only the bf16 scales/zeros tinygemm reads
    x = torch.randn(40, 512, device=device, dtype=torch.bfloat16)  # 40 rows: past the dense threshold
    torch.testing.assert_close(lean(x).float(), full(x).float(), rtol=2e-2, atol=2e-2 * float(full(x).abs().max()))
    assert all(torch.equal(v.cpu(), sd[k]) for k, v in lean.state_dict().items())
