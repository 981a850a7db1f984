"""The native Qwen-VL model against the fact sheet (shared/spec/qwen-vl.md): names and shapes of the
real checkpoint, vision-tower and resampler math, RoPE/NTK/logN, caching, image injection, HF
integration and clean errors for bad input."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import DynamicCache

import qvlq  # noqa: F401  (registers the Auto classes)
from qvlq.checkpoint import init_checkpoint, preset_config, tensor_inventory
from qvlq.model.config import QWenConfig
from qvlq.model.loading import CheckpointError, resolve_model_dir
from qvlq.model.modeling import (
    QWenLMHeadModel,
    QWenMLP,
    RMSNorm,
    logn_scale,
    ntk_alpha,
    rope_cos_sin,
)
from qvlq.model.vision import Resampler, VisualAttention, resize_pos_table, sincos_pos_embed_2d

QUANT_RE = re.compile(r"^(transformer\.h\.\d+\.(?:attn\.c_attn|attn\.c_proj|mlp\.w1|mlp\.w2|mlp\.c_proj))\.(\w+)$")


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# ==================================================================================== inventory


@pytest.fixture(scope="module")
def full_inventory() -> dict[str, tuple[int, ...]]:
    return tensor_inventory(preset_config("full"))


def test_full_parameter_count(full_inventory) -> None:
    total = sum(numel(s) for s in full_inventory.values())
    visual = sum(numel(s) for k, s in full_inventory.items() if k.startswith("transformer.visual."))
    assert total == 9_656_935_168
    assert visual == 1_935_610_624
    assert total - visual == 7_721_324_544


def test_names_match_official_int4_index(full_inventory, reference: Path) -> None:
    index = json.loads((reference / "qwen-vl-chat-int4" / "model.safetensors.index.json").read_text())
    official = set(index["weight_map"])
    ours = set(full_inventory)

    official_float = {k for k in official if not QUANT_RE.match(k)}
    ours_float = {k for k in ours if not QUANT_RE.match(k)}
    assert official_float == ours_float  # kept-fp16 tensors: same names, nothing extra, nothing missing

    def by_module(names: set[str]) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for k in names:
            m = QUANT_RE.match(k)
            if m:
                out.setdefault(m.group(1), set()).add(m.group(2))
        return out

    off_q, our_q = by_module(official), by_module(ours)
    assert len(off_q) == 160 and set(off_q) == set(our_q)
    for mod, suffixes in off_q.items():
        assert suffixes == {"qweight", "qzeros", "scales", "g_idx", "bias"}, mod
        # float side: .weight, plus .bias only on the fused c_attn (Int4 has an all-zero bias elsewhere)
        want = {"weight", "bias"} if mod.endswith("attn.c_attn") else {"weight"}
        assert our_q[mod] == want, mod


@pytest.mark.parametrize(
    "name, shape",
    [
        ("transformer.wte.weight", (151936, 4096)),
        ("lm_head.weight", (151936, 4096)),
        ("transformer.ln_f.weight", (4096,)),
        ("transformer.h.0.ln_1.weight", (4096,)),
        ("transformer.h.31.attn.c_attn.weight", (12288, 4096)),
        ("transformer.h.31.attn.c_attn.bias", (12288,)),
        ("transformer.h.0.attn.c_proj.weight", (4096, 4096)),
        ("transformer.h.0.mlp.w1.weight", (11008, 4096)),
        ("transformer.h.0.mlp.w2.weight", (11008, 4096)),
        ("transformer.h.0.mlp.c_proj.weight", (4096, 11008)),
        ("transformer.visual.conv1.weight", (1664, 3, 14, 14)),
        ("transformer.visual.positional_embedding", (256, 1664)),
        ("transformer.visual.ln_pre.bias", (1664,)),
        ("transformer.visual.transformer.resblocks.47.attn.in_proj.weight", (4992, 1664)),
        ("transformer.visual.transformer.resblocks.47.attn.in_proj.bias", (4992,)),
        ("transformer.visual.transformer.resblocks.0.attn.out_proj.weight", (1664, 1664)),
        ("transformer.visual.transformer.resblocks.0.mlp.c_fc.weight", (8192, 1664)),
        ("transformer.visual.transformer.resblocks.0.mlp.c_proj.weight", (1664, 8192)),
        ("transformer.visual.attn_pool.query", (256, 4096)),
        ("transformer.visual.attn_pool.pos_embed", (256, 4096)),
        ("transformer.visual.attn_pool.kv_proj.weight", (4096, 1664)),
        ("transformer.visual.attn_pool.attn.in_proj_weight", (12288, 4096)),
        ("transformer.visual.attn_pool.attn.in_proj_bias", (12288,)),
        ("transformer.visual.attn_pool.attn.out_proj.weight", (4096, 4096)),
        ("transformer.visual.attn_pool.ln_q.weight", (4096,)),
        ("transformer.visual.attn_pool.ln_kv.bias", (4096,)),
        ("transformer.visual.ln_post.weight", (4096,)),
        ("transformer.visual.proj", (4096, 4096)),
    ],
)
def test_spec_shapes(full_inventory, name: str, shape: tuple[int, ...]) -> None:
    assert full_inventory[name] == shape


def test_no_biases_where_the_spec_has_none(full_inventory) -> None:
    for absent in (
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.0.mlp.w1.bias",
        "transformer.h.0.mlp.c_proj.bias",
        "transformer.visual.conv1.bias",
        "transformer.visual.attn_pool.kv_proj.bias",
        "lm_head.bias",
    ):
        assert absent not in full_inventory
    assert sum(1 for k in full_inventory if ".resblocks." in k and k.endswith("attn.in_proj.weight")) == 48
    assert sum(1 for k in full_inventory if k.endswith("mlp.w2.weight")) == 32


# ==================================================================================== vision math


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_vit_attention_per_head_interleaved_layout() -> None:
    width, heads = 48, 4
    d = width // heads
    attn = VisualAttention(width, heads)
    _randomize(attn, 1)
    x = torch.randn(2, 10, width, generator=torch.Generator().manual_seed(2))

    W, b = attn.in_proj.weight, attn.in_proj.bias
    outs = []
    for h in range(heads):
        rows = slice(h * 3 * d, h * 3 * d + 3 * d)  # [q_h; k_h; v_h]
        Wh, bh = W[rows], b[rows]
        q = x @ Wh[:d].T + bh[:d]
        k = x @ Wh[d : 2 * d].T + bh[d : 2 * d]
        v = x @ Wh[2 * d :].T + bh[2 * d :]
        p = torch.softmax((q / math.sqrt(d)) @ k.transpose(-1, -2), dim=-1)  # no mask
        outs.append(p @ v)
    want = torch.cat(outs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias
    with torch.no_grad():
        got = attn(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # the contiguous q|k|v layout (what nn.MultiheadAttention uses) must give something else
    q, k, v = (x @ W.T + b).split(width, dim=-1)
    q, k, v = (t.view(2, 10, heads, d).transpose(1, 2) for t in (q, k, v))
    other = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 10, width)
    other = other @ attn.out_proj.weight.T + attn.out_proj.bias
    assert not torch.allclose(got, other, atol=1e-3)


def test_sincos_table_matches_mae_formula() -> None:
    dim, grid = 32, 4
    table = sincos_pos_embed_2d(dim, grid)
    assert table.shape == (grid * grid, dim) and table.dtype == torch.float32
    quarter = dim // 4
    omega = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]

    def axis(pos: int) -> list[float]:
        return [math.sin(pos * w) for w in omega] + [math.cos(pos * w) for w in omega]

    for row in range(grid):
        for col in range(grid):
            want = torch.tensor(axis(col) + axis(row))  # first half: column; second half: row
            torch.testing.assert_close(table[row * grid + col], want, atol=1e-6, rtol=1e-6)
    # row-major flattening: position 1 is (row 0, col 1), so only the first half moves
    assert not torch.allclose(table[1, : dim // 2], table[0, : dim // 2])
    assert torch.equal(table[1, dim // 2 :], table[0, dim // 2 :])


def test_resampler_pos_embed_is_stored_sincos(tiny_model) -> None:
    pool = tiny_model.transformer.visual.attn_pool
    assert torch.equal(pool.pos_embed.detach(), sincos_pos_embed_2d(128, 16))
    assert not pool.pos_embed.requires_grad


def test_resize_pos_table_bicubic_fp32() -> None:
    table = torch.randn(256, 24, generator=torch.Generator().manual_seed(3))
    got = resize_pos_table(table, 1024)
    grid = table.reshape(1, 16, 16, 24).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1024, 24)
    assert torch.equal(got, want)
    corners = F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    assert not torch.allclose(got, corners.reshape(1024, 24), atol=1e-3)
    # bf16 tables are resized in fp32 and cast back
    tb = table.bfloat16()
    got_b = resize_pos_table(tb, 1024)
    assert got_b.dtype == torch.bfloat16
    assert torch.equal(got_b, resize_pos_table(tb.float(), 1024).bfloat16())
    assert resize_pos_table(table, 256) is table  # same grid: untouched


def test_resampler_matches_hand_computation() -> None:
    n_q, dim, kv_dim, heads = 16, 256, 64, 2  # heads = dim // 128, as the reference
    pool = Resampler(n_q, dim, kv_dim)
    assert pool.num_heads == heads
    pos = pool.pos_embed.detach().clone()
    _randomize(pool, 4)
    with torch.no_grad():
        pool.pos_embed.copy_(pos)
    x = torch.randn(2, 64, kv_dim, generator=torch.Generator().manual_seed(5))  # an 8x8 patch grid

    def ln(t: torch.Tensor, m: torch.nn.LayerNorm) -> torch.Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * m.weight + m.bias

    kv = ln(x @ pool.kv_proj.weight.T, pool.ln_kv)
    grid = pos.reshape(1, 4, 4, dim).permute(0, 3, 1, 2)
    pos_kv = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(64, dim)
    Q = ln(pool.query, pool.ln_q) + pos  # [16, dim]
    K = kv + pos_kv
    V = kv
    Wq, Wk, Wv = pool.attn.in_proj_weight.chunk(3)
    bq, bk, bv = pool.attn.in_proj_bias.chunk(3)
    q, k, v = Q @ Wq.T + bq, K @ Wk.T + bk, V @ Wv.T + bv
    hd = dim // heads
    outs = []
    for h in range(heads):
        s = slice(h * hd, (h + 1) * hd)
        p = torch.softmax(q[:, s] @ k[..., s].transpose(-1, -2) / math.sqrt(hd), dim=-1)
        outs.append(p @ v[..., s])
    want = torch.cat(outs, -1) @ pool.attn.out_proj.weight.T + pool.attn.out_proj.bias
    with torch.no_grad():
        got = pool(x)
    assert got.shape == (2, n_q, dim)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # and with the library's own multi_head_attention_forward
    mha = pool.attn
    ref, _ = F.multi_head_attention_forward(
        Q.unsqueeze(1).expand(-1, 2, -1), K.transpose(0, 1), V.transpose(0, 1), dim, heads,
        mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
        mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False,
    )  # fmt: skip
    torch.testing.assert_close(got, ref.transpose(0, 1), atol=1e-4, rtol=1e-4)


def test_vision_tower_pipeline(tiny_model, image_file: Path, image_feats) -> None:
    """conv1 -> + bicubic(16->32) positions -> ln_pre -> blocks -> attn_pool -> ln_post -> @ proj."""
    from qvlq.image import load_image, pixels_for, preprocess

    vis = tiny_model.transformer.visual
    pixels = pixels_for([image_file], 448)
    assert pixels.shape == (1, 3, 448, 448)
    # §7: squash-resize bicubic to 448, [0,1], CLIP mean/std
    img = Image.open(image_file).convert("RGB").resize((448, 448), Image.Resampling.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)) / 255
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(pixels[0], ((arr - mean) / std).permute(2, 0, 1))
    assert torch.equal(preprocess(load_image(image_file), 448), pixels[0])
    with torch.no_grad():
        x = F.conv2d(pixels, vis.conv1.weight, stride=14).flatten(2).transpose(1, 2)
        assert x.shape == (1, 1024, 64)
        grid = vis.positional_embedding.reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
        x = x + F.interpolate(grid, size=(32, 32), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
        x = vis.ln_pre(x)
        for blk in vis.transformer.resblocks:
            x = x + blk.attn(blk.ln_1(x))
            x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(blk.ln_2(x))))  # exact (erf) GELU
        want = vis.ln_post(vis.attn_pool(x)) @ vis.proj
    assert image_feats.shape == (1, 256, 128)  # = vis(pixels)
    torch.testing.assert_close(image_feats, want, atol=1e-5, rtol=1e-5)


# ==================================================================================== RoPE, NTK, logN


def test_ntk_alpha_values() -> None:
    assert [ntk_alpha(n, 2048) for n in (1, 2048, 2049, 4096, 4097, 8192)] == [1, 1, 3, 3, 7, 7]
    assert ntk_alpha(16, 16) == 1 and ntk_alpha(32, 16) == 3 and ntk_alpha(40, 16) == 7


@pytest.mark.parametrize("alpha", [1.0, 3.0, 7.0])
def test_rope_tables_use_ntk_base(alpha: float) -> None:
    dim = 128
    base = 10000 * alpha ** (128 / 126)
    positions = torch.tensor([0, 1, 2, 37, 300])
    cos, sin = rope_cos_sin(positions, dim, 10000, alpha)
    assert cos.shape == (5, dim) and cos.dtype == torch.float32
    inv = torch.tensor([base ** (-2 * k / dim) for k in range(dim // 2)], dtype=torch.float64)
    ang = positions.double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)  # cat(freqs, freqs): rotate-half layout
    torch.testing.assert_close(cos.double(), ang.cos(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin.double(), ang.sin(), atol=2e-5, rtol=0)


def test_logn_scale_values() -> None:
    got = [logn_scale(p, p + 1, 2048)[0] for p in (0, 2047, 2048, 4095, 4096, 8191)]
    want = [1.0, 1.0] + [math.log(p + 1) / math.log(2048) for p in (2048, 4095, 4096, 8191)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[1] == 1.0 and got[2] > 1.0
    assert logn_scale(2046, 2050, 2048) == pytest.approx([1.0, 1.0, math.log(2049, 2048), math.log(2050, 2048)])


def reference_hidden(
    model, ids: torch.Tensor, alpha: float, logn: bool, seq_length: int, offset: int = 0
) -> torch.Tensor:
    """Independent fp32 forward of the text LLM from the spec (§3): final normed hidden states [S, C]
    for ids [S] sitting at positions offset..offset+S-1 (logits are these times lm_head.weight^T)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    S = ids.shape[0]
    eps = cfg.layer_norm_epsilon

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    base = cfg.rotary_emb_base * alpha ** (D / (D - 2))
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    pos = range(offset, offset + S)
    ang = torch.tensor(pos, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    factors = [math.log(p + 1) / math.log(seq_length) if logn and p + 1 > seq_length else 1.0 for p in pos]
    scale = torch.tensor(factors)[:, None]

    def rope(t: torch.Tensor) -> torch.Tensor:  # t [H, S, D]
        t1, t2 = t[..., : D // 2], t[..., D // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    h = sd["transformer.wte.weight"][ids]
    causal = torch.full((S, S), float("-inf")).triu(1)
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        x = rms(h, sd[p + "ln_1.weight"])
        qkv = x @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(S, H, D).transpose(0, 1) for t in qkv.split(H * D, dim=-1))
        q, k = rope(q), rope(k)
        q = q * scale  # logN on the query only
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + causal, dim=-1)
        h = h + (w @ v).transpose(0, 1).reshape(S, H * D) @ sd[p + "attn.c_proj.weight"].T
        x = rms(h, sd[p + "ln_2.weight"])
        a, g = x @ sd[p + "mlp.w1.weight"].T, x @ sd[p + "mlp.w2.weight"].T
        h = h + (a * F.silu(g)) @ sd[p + "mlp.c_proj.weight"].T
    return rms(h, sd["transformer.ln_f.weight"])


def hidden(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Final normed hidden states of the model (what lm_head sees), without the 151936-wide head."""
    kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return model.transformer(ids, **kwargs)[0]


def last_logits(model, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.setdefault("use_cache", False)
    with torch.no_grad():
        return model(ids, logits_to_keep=1, **kwargs).logits[:, -1]


def _text_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1000, 100000, (1, n), generator=torch.Generator().manual_seed(seed))


def test_reference_forward_agrees_below_seq_length(tiny_model) -> None:
    ids = _text_ids(12)
    ref = reference_hidden(tiny_model, ids[0], 1.0, True, 2048)
    torch.testing.assert_close(hidden(tiny_model, ids)[0], ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        last_logits(tiny_model, ids)[0], ref[-1] @ tiny_model.lm_head.weight.detach().T, atol=1e-5, rtol=1e-4
    )


def test_long_prompt_applies_ntk_and_logn_and_keeps_prefill_alpha(tiny_variant) -> None:
    model = tiny_variant(seq_length=16)
    head = model.lm_head.weight.detach()
    # prefill of 40 > seq_length: alpha 7 for the prompt and for every decoded token; logN on the queries
    ids = _text_ids(43, seed=1)
    ref = reference_hidden(model, ids[0], 7.0, True, 16)
    cache = DynamicCache(config=model.config)
    pre = hidden(model, ids[:, :40], cache=cache, use_cache=True)[0]
    torch.testing.assert_close(pre, ref[:40], atol=1e-5, rtol=1e-4)
    for t in range(40, 43):
        step = last_logits(model, ids[:, t : t + 1], cache=cache, use_cache=True)[0]
        torch.testing.assert_close(step, ref[t] @ head.T, atol=1e-5, rtol=1e-4)

    # prefill of 32 (alpha 3), then decoding past 32: the prefill's alpha is kept (a fresh full forward
    # of 33+ tokens chooses alpha 7)
    ref3 = reference_hidden(model, ids[0, :35], 3.0, True, 16)
    ref7 = reference_hidden(model, ids[0, :35], 7.0, True, 16)
    cache = DynamicCache(config=model.config)
    hidden(model, ids[:, :32], cache=cache, use_cache=True)
    for t in range(32, 35):
        step = hidden(model, ids[:, t : t + 1], cache=cache, use_cache=True)[0, -1]
        torch.testing.assert_close(step, ref3[t], atol=1e-5, rtol=1e-4)
        assert not torch.allclose(step, ref7[t], atol=1e-4)
    torch.testing.assert_close(hidden(model, ids[:, :33])[0, -1], ref7[32], atol=1e-5, rtol=1e-4)


def test_logn_only_past_seq_length(tiny_variant) -> None:
    on = tiny_variant(seq_length=16, use_dynamic_ntk=False)
    off = tiny_variant(seq_length=16, use_dynamic_ntk=False, use_logn_attn=False)
    assert torch.equal(hidden(on, _text_ids(16)), hidden(off, _text_ids(16)))  # exactly seq_length: no change
    a, b = hidden(on, _text_ids(20))[0], hidden(off, _text_ids(20))[0]
    torch.testing.assert_close(a[:16], b[:16], atol=1e-6, rtol=0)
    for p in range(16, 20):  # 0-based p with p + 1 > 16
        assert not torch.allclose(a[p], b[p], atol=1e-5), p
    # and the head turns that into different logits
    assert not torch.allclose(last_logits(on, _text_ids(20)), last_logits(off, _text_ids(20)), atol=1e-5)


def test_dynamic_ntk_only_past_seq_length(tiny_variant) -> None:
    on = tiny_variant(seq_length=16, use_logn_attn=False)
    off = tiny_variant(seq_length=16, use_logn_attn=False, use_dynamic_ntk=False)
    assert torch.equal(hidden(on, _text_ids(16)), hidden(off, _text_ids(16)))
    a, b = hidden(on, _text_ids(17))[0], hidden(off, _text_ids(17))[0]
    # alpha 3 changes every rotation except position 0's (angle 0 for any base)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    for p in range(1, 17):
        assert not torch.allclose(a[p], b[p], atol=1e-6), p


def test_training_mode_disables_ntk_and_logn(tiny_variant) -> None:
    model = tiny_variant(seq_length=16)
    plain = tiny_variant(seq_length=16, use_logn_attn=False, use_dynamic_ntk=False)
    ids = _text_ids(24)
    model.train()
    try:
        a = hidden(model, ids)
    finally:
        model.eval()
    torch.testing.assert_close(a, hidden(plain, ids), atol=1e-5, rtol=1e-5)


# ==================================================================================== cache and batching


def test_kv_cache_decoding_equals_full_forward_with_image(tiny_model, image_prompt, image_feats) -> None:
    ids = image_prompt("Describe it.")
    cache = DynamicCache(config=tiny_model.config)
    seq = ids
    logits = last_logits(tiny_model, ids, cache=cache, use_cache=True)  # encodes the picture from its path
    for _ in range(3):
        full = last_logits(tiny_model, seq, image_features=image_feats)
        assert (logits - full).abs().max() < 1e-4
        nxt = logits.argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
        logits = last_logits(tiny_model, nxt, cache=cache, use_cache=True)
    assert cache.get_seq_length() == seq.shape[1]
    assert (logits - last_logits(tiny_model, seq, image_features=image_feats)).abs().max() < 1e-4


def test_chunked_prefill_equals_single_prefill(tiny_model, image_prompt, tokenizer, image_feats) -> None:
    ids = image_prompt("What colour is the top left corner of the picture?")
    end = ids[0].tolist().index(tokenizer.img_end_id)
    k = end + 3  # the first chunk holds the whole image span
    single = hidden(tiny_model, ids, image_features=image_feats)
    cache = DynamicCache(config=tiny_model.config)
    first = hidden(tiny_model, ids[:, :k], image_features=image_feats, cache=cache, use_cache=True)
    second = hidden(tiny_model, ids[:, k:], cache=cache, use_cache=True)
    torch.testing.assert_close(torch.cat([first, second], 1), single, atol=1e-5, rtol=1e-4)
    nxt = torch.tensor([[1234]])
    step = last_logits(tiny_model, nxt, cache=cache, use_cache=True)
    full_next = last_logits(tiny_model, torch.cat([ids, nxt], 1), image_features=image_feats)
    torch.testing.assert_close(step, full_next, atol=1e-4, rtol=1e-4)


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_left_padded_batch_matches_single_rows(tiny_model, image_prompt, tokenizer, image_feats) -> None:
    a = image_prompt("Is there a cat?")[0].tolist()
    b = tokenizer.encode_text("Hello, who are you?")
    ids, mask = _left_pad([a, b], tokenizer.pad_token_id)
    batch = last_logits(tiny_model, ids, attention_mask=mask, image_features=image_feats)
    ra = last_logits(tiny_model, torch.tensor([a]), image_features=image_feats)[0]
    rb = last_logits(tiny_model, torch.tensor([b]))[0]
    assert not batch.isnan().any()
    # Positions are implicit, so row b's tokens sit at shifted positions; RoPE only sees relative offsets
    # and NTK/logN are inactive below seq_length, so the logits agree.
    torch.testing.assert_close(batch[0], ra, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[1], rb, atol=1e-4, rtol=1e-4)


def test_left_padding_shifts_positions_like_the_reference(tiny_variant, tokenizer) -> None:
    """Reference behaviour (§3: positions are implicit): past seq_length, the padded row's logN scales
    and the batch's NTK alpha follow the padded length, so the row no longer equals its own run."""
    model = tiny_variant(seq_length=16)
    a, b = _text_ids(24, 3)[0].tolist(), _text_ids(10, 4)[0].tolist()
    ids, mask = _left_pad([a, b], tokenizer.pad_token_id)
    batch = hidden(model, ids, attention_mask=mask)[:, -1]
    torch.testing.assert_close(batch[0], hidden(model, torch.tensor([a]))[0, -1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batch[1], hidden(model, torch.tensor([b]))[0, -1], atol=1e-3)
    # = its 10 tokens with the batch's NTK alpha (prompt length 24 -> 3) and logN at positions 14..23
    want = reference_hidden(model, torch.tensor(b), ntk_alpha(24, 16), True, 16, offset=14)[-1]
    torch.testing.assert_close(batch[1], want, atol=1e-5, rtol=1e-4)


# ==================================================================================== image injection


def test_image_features_replace_exactly_the_span(tiny_model, image_prompt, image_feats, tokenizer) -> None:
    prefix = tokenizer.encode_text("Look: ")
    ids = torch.cat([torch.tensor([prefix]), image_prompt("and answer.")], dim=1)
    row = ids[0].tolist()
    a, e = row.index(tokenizer.img_start_id), row.index(tokenizer.img_end_id)
    assert e - a - 1 == tiny_model.config.n_queries == 256
    seen = {}

    def grab(module, args) -> None:  # returns None: the block's inputs are left as they are
        seen["h"] = args[0]

    hook = tiny_model.transformer.h[0].register_forward_pre_hook(grab)
    try:
        hidden(tiny_model, ids)  # the picture is read from the path written in the prompt
    finally:
        hook.remove()
    h = seen["h"][0]
    with torch.no_grad():
        emb = tiny_model.transformer.wte(ids[0])
    inside = torch.zeros(len(row), dtype=torch.bool)
    inside[a + 1 : e] = True
    assert torch.equal(h[~inside], emb[~inside])  # <img>, </img> and all text keep their embeddings
    torch.testing.assert_close(h[inside], image_feats[0], atol=1e-6, rtol=0)
    assert not torch.allclose(h[inside], emb[inside])


def test_images_argument_equals_path_in_prompt(tiny_model, image_prompt, image_file, image_feats) -> None:
    from qvlq.image import pixels_for

    by_path = last_logits(tiny_model, image_prompt())
    # with images given, the path bytes in the prompt are not read (this one does not exist)
    bogus = image_prompt(path="does/not/exist.png")
    by_pil = last_logits(tiny_model, bogus, images=[Image.open(image_file)])
    pixels = pixels_for([image_file], 448)
    by_tensor = last_logits(tiny_model, bogus, images=pixels)
    by_feats = last_logits(tiny_model, bogus, image_features=image_feats)
    for other in (by_pil, by_tensor, by_feats):
        torch.testing.assert_close(other, by_path, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 images given for 1"):
        tiny_model(bogus, images=[pixels[0], pixels[0]], use_cache=False)


def test_two_images_in_one_prompt(tiny_model, tokenizer, image_file, image_feats, tmp_path) -> None:
    from qvlq.image import pixels_for

    other = tmp_path / "other.png"
    Image.new("RGB", (30, 40), (200, 10, 10)).save(other)
    text = f"Picture 1: <img>{image_file}</img>\nPicture 2: <img>{other}</img>\nCompare."
    ids = torch.tensor([tokenizer.encode_text(text)])
    with torch.no_grad():
        feats = torch.cat([image_feats, tiny_model.transformer.visual(pixels_for([other], 448))])
    by_path = last_logits(tiny_model, ids)
    torch.testing.assert_close(last_logits(tiny_model, ids, image_features=feats), by_path, atol=1e-6, rtol=0)
    swapped = last_logits(tiny_model, ids, image_features=feats.flip(0))
    assert not torch.allclose(swapped, by_path, atol=1e-5)


# ==================================================================================== LLM pieces


def test_rmsnorm_fp32_statistics_cast_back_before_weight() -> None:
    norm = RMSNorm(512, eps=1e-6).bfloat16()
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(512, generator=g) * 2)
    x = (torch.randn(8, 512, generator=g) * 5).bfloat16()
    with torch.no_grad():
        got = norm(x)
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16() * norm.weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    late_cast = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()).bfloat16()
    assert not torch.equal(got, late_cast)  # the cast really happens before the weight


def test_mlp_uses_w2_as_gate(tiny_model) -> None:
    mlp: QWenMLP = tiny_model.transformer.h[0].mlp
    x = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got = mlp(x)
        want = F.linear(F.linear(x, mlp.w1.weight) * F.silu(F.linear(x, mlp.w2.weight)), mlp.c_proj.weight)
        swapped = F.linear(F.linear(x, mlp.w2.weight) * F.silu(F.linear(x, mlp.w1.weight)), mlp.c_proj.weight)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, swapped, atol=1e-6)
    ff = tiny_model.config.intermediate_size // 2  # the MLP width is half of intermediate_size
    assert mlp.w1.weight.shape == mlp.w2.weight.shape == (ff, 128) and mlp.w1.bias is None
    assert mlp.c_proj.weight.shape == (128, ff)


def test_eager_attention_equals_sdpa(tiny_model, image_prompt, tokenizer, image_feats) -> None:
    ids = image_prompt()
    text = _text_ids(24, 5)
    pids, mask = _left_pad([text[0].tolist(), text[0, :9].tolist()], tokenizer.pad_token_id)

    def run() -> tuple[torch.Tensor, ...]:
        full = hidden(tiny_model, ids, image_features=image_feats)
        padded = hidden(tiny_model, pids, attention_mask=mask)
        cache = DynamicCache(config=tiny_model.config)
        hidden(tiny_model, text[:, :-3], cache=cache, use_cache=True)
        chunk = hidden(tiny_model, text[:, -3:], cache=cache, use_cache=True)
        return full, padded[0], padded[1, -9:], chunk

    sdpa = run()
    tiny_model.set_attn_eager(True)
    try:
        assert all(blk.attn.eager for blk in tiny_model.transformer.h)
        eager = run()
    finally:
        tiny_model.set_attn_eager(False)
    for e, s in zip(eager, sdpa, strict=True):
        torch.testing.assert_close(e, s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa[3][0], sdpa[1][-3:], atol=1e-5, rtol=1e-4)  # chunk == full prefill


# ==================================================================================== HF integration


def _link_dir(src: Path, dst: Path, config_updates: dict | None = None, weights: bool = True) -> Path:
    """A copy of a model dir: small files copied, weight files symlinked; config.json optionally edited."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            if weights:
                (dst / f.name).symlink_to(f)
        elif f.name != "model.safetensors.index.json" or weights:
            shutil.copy(f, dst / f.name)
    if config_updates is not None:
        cfg = json.loads((dst / "config.json").read_text())
        for k, v in config_updates.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_auto_classes_never_import_directory_code(tiny_dir, tiny_model, tmp_path, tokenizer) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    d = _link_dir(tiny_dir, tmp_path / "m", {"my_unknown_key": {"nested": [1, 2]}})
    for name in ("modeling_qwen.py", "configuration_qwen.py", "tokenization_qwen.py"):
        (d / name).write_text("raise RuntimeError('code from the model directory was imported')\n")
    before = {k for k in sys.modules if "transformers_modules" in k}

    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    cfg = AutoConfig.from_pretrained(d)

    assert type(model) is QWenLMHeadModel and type(cfg) is QWenConfig
    assert type(tok).__name__ == "QWenTokenizer"
    assert {k for k in sys.modules if "transformers_modules" in k} == before
    assert model.config.auto_map == {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    }
    assert model.config.my_unknown_key == {"nested": [1, 2]} == cfg.my_unknown_key
    assert model.config.to_official_dict("float32")["my_unknown_key"] == {"nested": [1, 2]}
    assert model.dtype == torch.float32 and not model.training
    _assert_same_weights(model, tiny_model)
    text = "Hello <ref>world</ref>"
    assert tok.encode_text(text) == tokenizer.encode_text(text)


def test_dtype_names_through_auto_classes_and_the_loader(tiny_dir) -> None:
    from transformers import AutoModelForCausalLM

    from qvlq.model.loading import load_model_and_tokenizer

    for name, want in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("half", torch.float16),
                       ("bfloat16", torch.bfloat16), (torch.float16, torch.float16)]:  # fmt: skip
        assert AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=name).dtype == want, name
    assert load_model_and_tokenizer(tiny_dir, "cpu", "fp16")[0].dtype == torch.float16
    for bad in ("bogus", "int8"):
        with pytest.raises(ValueError, match=f"unknown dtype '{bad}'"):
            AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=bad)
        with pytest.raises(ValueError, match=f"unknown dtype '{bad}'"):
            load_model_and_tokenizer(tiny_dir, "cpu", bad)


def test_n_queries_from_config_is_honoured(tiny_model, tokenizer, image_feats) -> None:
    visual = dict(tiny_model.config.visual, n_queries=64)
    cfg = QWenConfig(**{**tiny_model.config.to_dict(), "visual": visual})
    assert cfg.n_queries == 64
    assert cfg.to_official_dict("float32")["visual"]["n_queries"] == 64
    pool = Resampler(cfg.n_queries, 128, 64)  # what the tower builds, on CPU: a real 8x8 sin-cos table
    assert pool.query.shape == (64, 128) and torch.equal(pool.pos_embed.detach(), sincos_pos_embed_2d(128, 8))
    with torch.device("meta"):
        model = QWenLMHeadModel(cfg)
    assert model.transformer.visual.attn_pool.query.shape == (64, 128)
    assert model.transformer.visual.attn_pool.pos_embed.shape == (64, 128)
    sd = dict(tiny_model.state_dict())
    sd["transformer.visual.attn_pool.query"] = torch.randn(64, 128)
    sd["transformer.visual.attn_pool.pos_embed"] = pool.pos_embed.detach()
    model.load_state_dict(sd, assign=True)
    model.eval()
    with torch.no_grad():
        feats = model.transformer.visual(torch.zeros(1, 3, 448, 448))
    assert feats.shape == (1, 64, 128)
    span = [tokenizer.img_start_id] + [tokenizer.img_pad_id] * 64 + [tokenizer.img_end_id]
    ids = torch.tensor([tokenizer.encode_text("a") + span + tokenizer.encode_text("b")])
    assert hidden(model, ids, image_features=feats).shape == (1, 68, 128)
    with pytest.raises(ValueError, match="expected 64"):
        hidden(model, torch.tensor([[tokenizer.img_start_id] + [tokenizer.img_pad_id] * 256 + [tokenizer.img_end_id]]))


def test_dtype_resolution(tiny_dir, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    plain = _link_dir(tiny_dir, tmp_path / "plain")
    fp16 = _link_dir(tiny_dir, tmp_path / "fp16", {"fp16": True})
    bf16 = _link_dir(tiny_dir, tmp_path / "bf16", {"bf16": True})
    assert QWenLMHeadModel.from_pretrained(plain, dtype="auto").dtype == torch.float32  # auto on CPU
    assert QWenLMHeadModel.from_pretrained(bf16).dtype == torch.bfloat16
    assert QWenLMHeadModel.from_pretrained(fp16, dtype="fp32").dtype == torch.float32  # explicit wins
    assert QWenLMHeadModel.from_pretrained(fp16, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert QWenLMHeadModel.from_pretrained(plain, torch_dtype="float16").dtype == torch.float16
    assert AutoModelForCausalLM.from_pretrained(fp16).dtype == torch.float16
    assert AutoModelForCausalLM.from_pretrained(fp16, dtype=torch.float32).dtype == torch.float32
    m = QWenLMHeadModel.from_pretrained(fp16, dtype="auto")
    assert m.dtype == torch.float16
    # every floating tensor, the vision tower and the stored sin-cos table included
    assert {t.dtype for t in m.state_dict().values()} == {torch.float16}


def test_bin_weights_load_through_weights_only(tiny_dir, tiny_model, tmp_path) -> None:
    d = _link_dir(tiny_dir, tmp_path / "bin", weights=False)
    torch.save(tiny_model.state_dict(), d / "pytorch_model.bin")
    _assert_same_weights(QWenLMHeadModel.from_pretrained(d), tiny_model)

    class Evil:
        def __reduce__(self):
            return (os.path.join, ("pwned", "x"))

    bad = _link_dir(tiny_dir, tmp_path / "evil", weights=False)
    torch.save({"transformer.ln_f.weight": torch.ones(128), "x": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        QWenLMHeadModel.from_pretrained(bad)


def test_sharded_checkpoint_loads_identically(tiny_model, tmp_path) -> None:
    info = init_checkpoint(tmp_path / "sharded", "tiny", seed=0, dtype="fp32", max_shard_bytes=30_000_000)
    assert info.n_shards >= 3  # wte and lm_head (78 MB each) alone already need two
    files = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(files) == info.n_shards
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    _assert_same_weights(QWenLMHeadModel.from_pretrained(tmp_path / "sharded"), tiny_model)


def test_hf_generate_matches_qvlq_greedy(tiny_model, tokenizer, image_prompt) -> None:
    from qvlq.generate import Sampling, generate

    ids = image_prompt()  # the first forward reads the picture; later ones run on the cache
    with torch.no_grad():
        hf = tiny_model.generate(ids, max_new_tokens=5, do_sample=False)
    ours = generate(tiny_model, ids, 5, Sampling(do_sample=False))
    assert hf[0, ids.shape[1] :].tolist() == ours
    assert torch.equal(hf[0, : ids.shape[1]], ids[0])


# ==================================================================================== errors


def _write_config(d: Path, cfg: dict) -> Path:
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def bad_inputs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory, reference: Path) -> dict:
    root = tmp_path_factory.mktemp("bad")
    ref_cfg = json.loads((reference / "qwen-vl-chat" / "config.json").read_text())
    text_only = {k: v for k, v in ref_cfg.items() if k != "visual"}
    trunc = root / "trunc"
    trunc.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, trunc / f.name)
    shard = next(tiny_dir.glob("*.safetensors"))
    with open(shard, "rb") as src, open(trunc / shard.name, "wb") as dst:
        dst.write(src.read(shard.stat().st_size // 2))
    missing = _link_dir(tiny_dir, root / "missing_shard")
    next(missing.glob("*.safetensors")).unlink()
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    return {
        "missing_dir": str(root / "no" / "such" / "dir"),
        "llama": str(_write_config(root / "llama", {"model_type": "llama", "hidden_size": 4096})),
        "text_only": str(_write_config(root / "qwen_text", text_only)),
        "truncated": str(trunc),
        "missing_shard": str(missing),
        "corrupt_image": str(corrupt),
        "missing_image": str(root / "nope.png"),
        "long_image": "/" + "x" * 300 + ".png",
    }


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_dir", "not found"),
        ("llama", "model_type is 'llama'.*not a Qwen-VL"),
        ("text_only", "no 'visual'.*text-only"),
        ("truncated", "truncated"),
        ("missing_shard", r"listed in model\.safetensors\.index\.json are missing: model-"),
    ],
)
def test_bad_model_dirs(bad_inputs, case: str, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        QWenLMHeadModel.from_pretrained(bad_inputs[case])


def test_bad_images_in_prompt(tiny_model, image_prompt, bad_inputs, tokenizer) -> None:
    from qvlq.image import ImageLoadError

    with pytest.raises(ImageLoadError, match="cannot read image .*corrupt.png"):
        tiny_model(image_prompt(path=bad_inputs["corrupt_image"]), use_cache=False)
    with pytest.raises(ImageLoadError, match="image not found: .*nope.png"):
        tiny_model(image_prompt(path=bad_inputs["missing_image"]), use_cache=False)
    with pytest.raises(ValueError, match="at most 255"):
        tokenizer.encode_text(f"<img>{bad_inputs['long_image']}</img>")
    # a hand-built span without a pad (256 path bytes) is refused by the model too
    ids = torch.tensor([[tokenizer.img_start_id] + [ord("a")] * 256 + [tokenizer.img_end_id]])
    with pytest.raises(ValueError, match="255 bytes"):
        tiny_model(ids, use_cache=False)
    with pytest.raises(ValueError, match="unbalanced"):
        tiny_model(torch.tensor([[tokenizer.img_start_id, 100, 200]]), use_cache=False)


def test_hub_id_offline_is_clear_and_fast(offline_hub) -> None:
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError) as err:
        QWenLMHeadModel.from_pretrained("Qwen/Qwen-VL-Chat")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "Qwen/Qwen-VL-Chat" in msg and "hub" in msg.lower() and "local" in msg.lower()
    assert "\n" not in msg


def test_hub_id_without_offline_flag(monkeypatch, tmp_path) -> None:
    """Online code path, pointed at a closed local port so nothing is ever downloaded."""
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    result: dict = {}

    def run() -> None:
        try:
            resolve_model_dir("Qwen/Qwen-VL-Chat")
        except Exception as e:  # noqa: BLE001 (inspected below)
            result["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t0 = time.perf_counter()
    t.start()
    t.join(15)
    assert not t.is_alive(), "hub lookup did not fail within 15 s"
    assert time.perf_counter() - t0 < 15
    err = result["err"]
    assert isinstance(err, CheckpointError)
    assert "hub" in str(err).lower() and "local" in str(err).lower()


def _cli(args: list[str]):
    from typer.testing import CliRunner

    from qvlq.cli import app

    return CliRunner().invoke(app, args)


def _assert_clean_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), lines[0]
    assert needle.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in result.output + result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing_dir", "not found"),
        ("llama", "not a Qwen-VL"),
        ("text_only", "text-only"),
        ("truncated", "truncated"),
        ("missing_shard", "missing"),
    ],
)
def test_cli_bad_model_dirs(bad_inputs, case: str, needle: str) -> None:
    _assert_clean_error(_cli(["chat", bad_inputs[case], "hi", "--greedy", "--max-new-tokens", "2"]), needle)


@pytest.mark.parametrize(
    "case, needle", [("corrupt_image", "cannot read image"), ("missing_image", "not found"), ("long_image", "255")]
)
def test_cli_bad_images(tiny_dir, tiny_model, tokenizer, bad_inputs, monkeypatch, case: str, needle: str) -> None:
    import qvlq.cli

    # the session's model instead of a reload (the CLI's loading is covered by the bad-dir cases)
    monkeypatch.setattr(qvlq.cli, "load_model_and_tokenizer", lambda *a: (tiny_model, tokenizer))
    args = ["chat", str(tiny_dir), "--image", bad_inputs[case], "what?", "--greedy", "--max-new-tokens", "2"]
    _assert_clean_error(_cli(args), needle)


def test_cli_hub_id_offline(offline_hub) -> None:
    _assert_clean_error(_cli(["chat", "Qwen/Qwen-VL-Chat", "hi"]), "hub")
