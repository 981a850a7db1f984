"""GPTQModel's GPTQ on one layer, for the interop test and the per-module benchmark (optional extra:
``pip install -e .[interop]``; gptqmodel is imported only when called)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .gptq import QuantSpec


@dataclass
class TheirResult:
    weight: Tensor  # dequantized float32 [out, in]
    codes: Tensor  # uint8 [out, in]
    hessian_s: float
    quantize_s: float


def gptqmodel_quantize(weight: Tensor, inputs: Tensor, spec: QuantSpec, chunk: int = 2048) -> TheirResult:
    """Quantize ``weight`` [out, in] with GPTQModel's GPTQ on calibration rows ``inputs`` [n, in], fed
    in ``chunk``-row batches. ``spec.act_group_aware`` picks its GAR ordering, False its classic GPTQ."""
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ as TheirGPTQ

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data.copy_(weight)
    qcfg = QuantizeConfig(bits=spec.bits, group_size=spec.group_size, sym=spec.sym, desc_act=spec.desc_act,
                          damp_percent=spec.damp_percent, act_group_aware=spec.act_group_aware)  # fmt: skip
    t0 = time.perf_counter()
    gq = TheirGPTQ(lin, qcfg)
    gq.quantizer.configure(perchannel=True)  # what its GPTQ processor does before add_batch
    for c in inputs.split(chunk):
        gq.add_batch(c.unsqueeze(0), None)
    t1 = time.perf_counter()
    scale, zero, g_idx, *_ = gq.hf_quantize(
        blocksize=spec.block_size, percdamp=spec.damp_percent, group_size=spec.group_size, actorder=spec.desc_act,
        act_group_aware=spec.act_group_aware,
    )  # fmt: skip
    t2 = time.perf_counter()
    q = lin.weight.data.float()
    g = g_idx.long()
    codes = torch.round(q / scale[:, g] + zero[:, g]).clamp(0, spec.maxq).to(torch.uint8)
    return TheirResult(q, codes, t1 - t0, t2 - t1)
