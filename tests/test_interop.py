"""Interop with GPTQModel (optional): qvlq's packed GPTQ v1 tensors read through GPTQModel's torch
GPTQ linear give the same weights and outputs as qvlq's own QuantLinear.

Skipped unless gptqmodel is importable. GPTQModel 7.6.x installs beside the CPU torch 2.13
(`pip install -c <(echo torch==2.13.0+cpu) gptqmodel==7.6.0`, in a separate environment: it pins
numpy==2.2.6); 7.7 needs torch>=2.14.1 and would replace it."""

from __future__ import annotations

import pytest
import torch

gptqmodel = pytest.importorskip("gptqmodel")


def _qvlq_layer(in_f: int, out_f: int, desc_act: bool, static_groups: bool, seed: int = 0):
    """A random linear quantized by qvlq's GPTQ: (float weight, calibration inputs, v1 tensors with bias)."""
    from qvlq.gptq import GPTQ, QuantSpec
    from qvlq.int4 import quantized_state_dict_entries

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    bias = torch.randn(out_f, generator=g) * 0.1
    x = torch.randn(512, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)  # uneven diag(H): act-order matters
    gq = GPTQ((out_f, in_f))
    gq.add_batch(x)
    res = gq.quantize(w, QuantSpec(desc_act=desc_act, static_groups=static_groups))
    entries = quantized_state_dict_entries("m", res, bias)
    return w, x, {k.removeprefix("m."): v for k, v in entries.items()}


def _gptqmodel_linear(sd: dict[str, torch.Tensor], in_f: int, out_f: int, desc_act: bool):
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

    m = TorchLinear(bits=4, group_size=128, sym=True, desc_act=desc_act, in_features=in_f, out_features=out_f,
                    bias=True, pack_dtype=torch.int32)  # fmt: skip
    for name, t in sd.items():
        getattr(m, name).data.copy_(t)
    convert_gptq_v1_to_v2_format_module(m, bits=4, pack_dtype=torch.int32)  # as its loader does for v1 files
    m.post_init()
    return m.eval()


@pytest.mark.parametrize(
    "desc_act,static_groups", [(False, False), (True, True), (True, False)], ids=["plain", "act-static", "act-dyn"]
)
def test_gptqmodel_reads_qvlq_tensors(desc_act, static_groups):
    from qvlq.int4 import QuantLinear, dequantize_gptq_v1

    in_f, out_f = 384, 256
    w, x_cal, sd = _qvlq_layer(in_f, out_f, desc_act, static_groups)
    ours = dequantize_gptq_v1(sd["qweight"], sd["qzeros"], sd["scales"], sd["g_idx"])
    theirs_mod = _gptqmodel_linear(sd, in_f, out_f, desc_act)
    theirs = theirs_mod.dequantize_weight()
    theirs = theirs.T if theirs.shape == (in_f, out_f) else theirs
    # GPTQModel dequantizes in fp16: scale * (q - zero) rounded once, so equal to ours rounded to fp16
    # exactly when codes, zero points, scales and the group map all agree.
    assert theirs.dtype == torch.float16
    assert torch.equal(theirs, ours.half())
    ref = x_cal @ w.T
    assert float((x_cal @ ours.T - ref).norm() / ref.norm()) < 0.15  # a 4-bit approximation of this layer

    ql = QuantLinear(in_f, out_f, bits=4, group_size=128)
    ql.load_state_dict(sd)
    x = torch.randn(3, 7, in_f, generator=torch.Generator().manual_seed(1)).half()
    with torch.no_grad():
        a, b = theirs_mod(x).float(), ql(x).float()
    assert float((a - b).norm() / b.norm()) < 2e-3


@pytest.mark.parametrize(
    "gar,desc_act", [(False, False), (True, False), (False, True)], ids=["classic", "gar", "act-order"]
)
def test_gptq_core_agrees_with_gptqmodel(gar, desc_act):
    """Same layer, same calibration: >= 95% identical codes (qvlq rounds scales to fp16 before coding
    and sums in another order; a differing code shifts the later error feedback) and the same output
    error within 1%."""
    from qvlq.gptq import GPTQ, QuantSpec
    from qvlq.interop import gptqmodel_quantize

    g = torch.Generator().manual_seed(3)
    in_f, out_f = 512, 256
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    x = torch.randn(1024, in_f, generator=g) * torch.logspace(-1, 1, in_f)[torch.randperm(in_f, generator=g)]
    gq = GPTQ((out_f, in_f))
    for c in x.split(256):
        gq.add_batch(c)
    spec = QuantSpec(act_group_aware=gar, desc_act=desc_act)
    ours = gq.quantize(w, spec)
    theirs = gptqmodel_quantize(w, x, spec, chunk=256).codes
    same = (ours.codes == theirs).float().mean()
    assert same >= 0.95, float(same)

    def err(codes: torch.Tensor) -> float:
        gi = ours.g_idx.long()
        q = (codes.float() - ours.zeros[gi].T) * ours.scales[gi].T
        ref = x @ w.T
        return float(((x @ q.T - ref).norm() / ref.norm()) ** 2)

    assert err(ours.codes) == pytest.approx(err(theirs), rel=0.01)
