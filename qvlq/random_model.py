"""Full-size (or tiny) Qwen-VL-Chat models with seeded random weights, generated on the device, and their
Int4 variant in the official GPTQ v1 layout by round-to-nearest: what `qvlq profile --random-weights` runs
(speed and memory do not depend on weight values) when no checkpoint can be downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

from .model.loading import QUANTIZED_LINEARS
from .model.stream import StreamedBlocks


def _fill_random(name: str, p: torch.Tensor, config: Any, g: torch.Generator) -> None:
    """Initialise one tensor in place, on its device (same rules as qvlq.checkpoint's init)."""
    from .model.vision import sincos_pos_embed_2d

    if name.endswith("attn_pool.pos_embed"):
        p.copy_(sincos_pos_embed_2d(p.shape[1], int(round(p.shape[0] ** 0.5))))
        return
    norms = (".ln_1.", ".ln_2.", "ln_f.", "ln_pre.", "ln_post.", "ln_q.", "ln_kv.")
    if any(n in name for n in norms):
        p.fill_(1.0 if name.endswith("weight") else 0.0)
        return
    if name.endswith("bias"):
        p.zero_()
        return
    std = float(config.initializer_range)
    if name.endswith("visual.positional_embedding"):
        std = p.shape[1] ** -0.5
    elif name.endswith("visual.proj"):
        std = p.shape[0] ** -0.5
    elif name.startswith("transformer.h.") and name.endswith("c_proj.weight"):
        std = std / (2 * config.num_hidden_layers) ** 0.5
    p.normal_(0.0, std, generator=g)


def build_random_model(size: str, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A Qwen-VL-Chat with seeded random weights allocated and generated on `device` (no disk, no host copy)."""
    from .checkpoint import preset_config
    from .model.modeling import QWenLMHeadModel

    config = preset_config(size)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _fill_random(name, p, config, g)
    model.requires_grad_(False)
    model.eval()
    model.config.dtype = dtype
    model.name_or_path = f"random:{size}"
    return model


def rtn_quantize(
    w: torch.Tensor, bits: int = 4, group_size: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric codes of W [out, in] (qvlq.gptq.round_to_nearest, the RTN of the
    quantize baseline): codes uint8 [out, in], scales fp32 [G, out], zeros int32 [G, out], g_idx int32."""
    from .gptq import QuantSpec, round_to_nearest

    r = round_to_nearest(w, QuantSpec(bits=bits, group_size=group_size))
    return r.codes, r.scales, r.zeros, r.g_idx


def quantize_model_rtn(
    model: Any, bits: int = 4, group_size: int = 128, dtype: torch.dtype = torch.float16, backend: str = "auto"
) -> dict[str, int]:
    """Turn a float model into the official Int4 layout in place, one linear at a time (peak memory:
    the float model plus one layer's temporaries): RTN codes packed by qvlq.int4.pack_gptq_v1 into
    QuantLinear buffers, prepared for `backend`; the other weights cast to `dtype` (the official Int4
    checkpoint keeps them fp16). Returns how many layers each backend serves."""
    from .int4 import QuantLinear, pack_gptq_v1

    backends: dict[str, int] = {}
    with torch.no_grad():
        for block in model.transformer.h:
            for name in QUANTIZED_LINEARS:
                parent_name, attr = name.split(".")
                parent = getattr(block, parent_name)
                lin = getattr(parent, attr)
                codes, scales, zeros, g_idx = rtn_quantize(lin.weight, bits, group_size)
                packed = pack_gptq_v1(codes, scales, zeros, g_idx, bits=bits)
                del codes, scales, zeros
                ql = QuantLinear(lin.in_features, lin.out_features, bits=bits, group_size=group_size,
                                 device=lin.weight.device)  # fmt: skip
                for k, v in packed.items():
                    getattr(ql, k).copy_(v)
                if lin.bias is not None:
                    ql.bias.copy_(lin.bias)
                del packed
                setattr(parent, attr, ql)
                del lin
                # torch's int4 kernels need whole groups; a ragged tiny layer falls back to dequant
                # lean: the device keeps only the kernel's copy of the weight (memory as the seed measures it)
                ql.prepare(backend if ql.in_features % group_size == 0 else "dequant", lean=ql.bias.is_cuda)
                backends[ql.backend] = backends.get(ql.backend, 0) + 1
        for p in model.parameters():  # QuantLinear holds buffers only, so its caches are untouched
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for m in model.modules():  # a vision tower streamed from host memory keeps its blocks outside parameters()
            if isinstance(m, StreamedBlocks):
                m.cast_(dtype)
    cfg = model.config
    cfg.quantization_config = {
        "bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
        "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
        "quant_method": "gptq",
    }  # fmt: skip
    cfg.bf16, cfg.fp16, cfg.fp32 = dtype == torch.bfloat16, dtype == torch.float16, dtype == torch.float32
    cfg.dtype = dtype
    return backends
