"""Qwen-VL (base and chat) as a transformers PreTrainedModel, parameter names identical to the
official checkpoints. Read top to bottom: norms and rotary helpers, the LLM block, the model with
image injection, the LM head. Semantics follow the official remote code where it is odd (softmax in
the compute dtype for the eager path, the dynamic-NTK alpha rule, logN only past seq_length)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import QWenConfig
from .vision import VisionTower

# transformers renamed the output's cache field from past_key_values to cache during 5.x
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in fp32, then back to the compute dtype before the weight (qvlq's int4 kernel rounds the
    same way in its norm prologue)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


# ---------------------------------------------------------------- rotary, NTK and logN
def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic-NTK alpha for a prompt of `length` tokens: 1 up to seq_length, 3 up to 2x, 7 up to 4x..."""
    context = math.log(length / seq_length, 2) + 1
    return float(max(2 ** math.ceil(context) - 1, 1))


def rope_cos_sin(
    positions: torch.Tensor, dim: int, base: float, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin tables [S, dim] for rotate-half RoPE with the NTK-scaled base."""
    scaled_base = base * alpha ** (dim / (dim - 2))
    inv_freq = 1.0 / (scaled_base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; rotation done in fp32 and cast back, as the reference does."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).type_as(x)


def logn_scale(start: int, end: int, seq_length: int) -> list[float]:
    """Query scale for 0-based positions [start, end): log_{seq_length}(p+1) once p+1 > seq_length."""
    return [math.log(p + 1, seq_length) if p + 1 > seq_length else 1.0 for p in range(start, end)]


# ---------------------------------------------------------------- LLM block
class QWenAttention(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        proj = config.kv_channels * config.num_attention_heads
        self.c_attn = nn.Linear(config.hidden_size, 3 * proj)  # fused q|k|v, with bias
        self.c_proj = nn.Linear(proj, config.hidden_size, bias=not config.no_bias)
        self.scale_attn_weights = config.scale_attn_weights
        self.eager = False  # reference numerics (matmul + softmax in the compute dtype) when True

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        logn: torch.Tensor | None,
        cache: Cache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(self.num_heads * self.head_dim, dim=-1)
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if logn is not None:  # only the query is scaled; cached keys never are
            q = q * logn.to(q.dtype)
        if self.eager:
            out = self._eager(q, k, v, mask)
        else:
            causal = mask is None and s > 1 and s == k.shape[2]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.c_proj(out.transpose(1, 2).reshape(b, s, -1))

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        w = q @ k.transpose(-1, -2)
        if self.scale_attn_weights:
            w = w / torch.full([], v.shape[-1] ** 0.5, dtype=w.dtype, device=w.device)
        if mask is None:
            mask = causal_mask(q.shape[2], k.shape[2], w.dtype, w.device)
        w = torch.softmax(w + mask, dim=-1).type(v.dtype)
        return w @ v


class QWenMLP(nn.Module):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__()
        ff = config.intermediate_size // 2
        self.w1 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.w2 = nn.Linear(config.hidden_size, ff, bias=not config.no_bias)
        self.c_proj = nn.Linear(ff, config.hidden_size, bias=not config.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))  # w2 is the gate


class QWenBlock(nn.Module):
    def __init__(self, config: QWenConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = QWenAttention(config, layer_idx)
        self.ln_2 = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mlp = QWenMLP(config)

    def forward(self, x: torch.Tensor, *attn_args: Any) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), *attn_args)
        return x + self.mlp(self.ln_2(x))


def causal_mask(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [q_len, k_len] mask; queries are the last q_len of k_len positions."""
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------- models
class QWenPreTrainedModel(PreTrainedModel):
    config_class = QWenConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["QWenBlock", "VisualBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            nn.init.normal_(module.in_proj_weight, std=std)
            nn.init.zeros_(module.in_proj_bias)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """Native loader: safetensors shards streamed into a meta-built model, GPTQ Int4 through
        qvlq's QuantLinear, never any code from the model directory (see qvlq.model.loading)."""
        from .loading import load_pretrained

        return load_pretrained(cls, pretrained_model_name_or_path, **kwargs)


class QWenModel(QWenPreTrainedModel):
    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.drop = nn.Dropout(config.emb_dropout_prob)
        self.h = nn.ModuleList(QWenBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.visual = VisionTower(config.visual)
        self.rotary_dim = int(config.kv_channels * config.rotary_pct)
        self.gradient_checkpointing = False
        self.post_init()

    # -- images
    def image_spans(self, input_ids: torch.Tensor) -> list[tuple[int, int, int]]:
        """(row, start, end) of every <img>..</img>; features go to start+1..end-1 (n_queries slots)."""
        cfg = self.config
        starts = (input_ids == cfg.image_start_id).nonzero().tolist()
        ends = (input_ids == cfg.image_end_id).nonzero().tolist()
        if len(starts) != len(ends) or any(a[0] != b[0] or b[1] <= a[1] for a, b in zip(starts, ends, strict=True)):
            raise ValueError("unbalanced <img> ... </img> tokens in input_ids")
        spans = [(a[0], a[1], b[1]) for a, b in zip(starts, ends, strict=True)]
        for _, a, e in spans:
            if e - a - 1 != cfg.n_queries:
                raise ValueError(f"an image span holds {e - a - 1} tokens, expected {cfg.n_queries}")
        return spans

    def image_paths(self, input_ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> list[str]:
        """Recover the path bytes the tokenizer wrote as ids 0..255 before the <imgpad> run."""
        pad = self.config.image_pad_id
        paths = []
        for r, a, e in spans:
            ids = input_ids[r, a + 1 : e - 1].tolist()  # the last slot must be a pad, as in the reference
            if pad not in ids:
                raise ValueError("image path in input_ids has no <imgpad>: paths are limited to 255 bytes")
            raw = ids[: ids.index(pad)]
            if any(t > 255 for t in raw):
                raise ValueError("image span holds non-byte tokens: was it encoded by QWenTokenizer?")
            paths.append(bytes(raw).decode("utf-8"))
        return paths

    def encode_images(self, images: Any) -> torch.Tensor:
        from ..image import pixels_for

        if isinstance(images, torch.Tensor) and images.dim() == 4:
            pixels = images
        else:
            pixels = pixels_for(list(images), self.visual.image_size)
        return self.visual(pixels)

    def embed(
        self, input_ids: torch.Tensor, images: Any = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with image features written over the n_queries slots of every image span
        (call it for a prefill only: like the reference, a generated <img> id is just a token)."""
        cfg = self.config
        h = self.drop(self.wte(input_ids))
        if not (input_ids == cfg.image_start_id).any():
            return h
        spans = self.image_spans(input_ids)
        if image_features is None:
            if images is None:
                images = self.image_paths(input_ids, spans)
            elif len(images) != len(spans):
                raise ValueError(f"{len(images)} images given for {len(spans)} <img> spans in the prompt")
            image_features = self.encode_images(images)
        h = h.clone()
        for (r, a, e), feats in zip(spans, image_features.to(h.dtype), strict=True):
            h[r, a + 1 : e] = feats
        return h

    def position_inputs(
        self, past: int, s: int, alpha: float, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE tables for positions past..past+s-1 and the logN query factors (None when all are 1)."""
        cfg = self.config
        positions = torch.arange(past, past + s, device=device)
        cos, sin = rope_cos_sin(positions, self.rotary_dim, cfg.rotary_emb_base, alpha)
        logn = None
        if cfg.use_logn_attn and not self.training and past + s > cfg.seq_length:
            logn = torch.tensor(logn_scale(past, past + s, cfg.seq_length), device=device)[:, None]
        return cos, sin, logn

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: Any = None,
        image_features: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values: Cache | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, Cache | None]:
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        past_key_values = cache if cache is not None else past_key_values  # transformers 5 says `cache`
        if use_cache and past_key_values is None and not self.training:
            past_key_values = DynamicCache(config=cfg)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0

        if inputs_embeds is not None:
            h = self.drop(inputs_embeds)
        elif past == 0:
            h = self.embed(input_ids, images, image_features)
        else:
            h = self.drop(self.wte(input_ids))
        b, s, _ = h.shape
        # NTK alpha is fixed by the prefill (eval only) and kept while decoding, as the reference does.
        if past == 0:
            alpha = ntk_alpha(s, cfg.seq_length) if cfg.use_dynamic_ntk and not self.training else 1.0
            if past_key_values is not None:
                past_key_values.qvlq_ntk_alpha = alpha
        else:
            alpha = getattr(past_key_values, "qvlq_ntk_alpha", 1.0)
        cos, sin, logn = self.position_inputs(past, s, alpha, h.device)
        mask = None  # None lets SDPA use its causal fast path (full prefill) or attend to all (decode)
        if attention_mask is not None and not bool(attention_mask.all()):
            pad = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
            mask = causal_mask(s, past + s, h.dtype, h.device) + pad
        elif past > 0 and s > 1:  # a chunk appended to a cache needs an offset causal mask
            mask = causal_mask(s, past + s, h.dtype, h.device)

        cache = past_key_values if use_cache else None
        for block in self.h:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(block, h, cos, sin, logn, None, mask, use_reentrant=False)
            else:
                h = block(h, cos, sin, logn, cache, mask)
        return self.ln_f(h), (past_key_values if use_cache else None)


class QWenLMHeadModel(QWenPreTrainedModel, GenerationMixin):
    _tied_weights_keys: list[str] = []

    def __init__(self, config: QWenConfig) -> None:
        super().__init__(config)
        self.transformer = QWenModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_attn_eager(self, eager: bool = True) -> None:
        """Reference attention numerics (explicit matmul, softmax in the compute dtype)."""
        for block in self.transformer.h:
            block.attn.eager = eager

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        images: Any = None,
        image_features: torch.Tensor | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        h, cache = self.transformer(
            input_ids,
            images=images,
            image_features=image_features,
            cache=cache if cache is not None else past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    # -- chat API of the official model
    def chat(self, tokenizer: Any, query: str, history: list | None = None, **kwargs: Any) -> tuple[str, list]:
        from ..chat import chat

        return chat(self, tokenizer, query, history=history, **kwargs)

    def chat_stream(self, tokenizer: Any, query: str, history: list | None = None, **kwargs: Any) -> Any:
        from ..chat import chat_stream

        return chat_stream(self, tokenizer, query, history=history, **kwargs)
