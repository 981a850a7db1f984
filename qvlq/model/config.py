"""Qwen-VL configuration: every key of the official config.json, nothing executed from the model dir."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PreTrainedConfig

SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dtype_name(name: str) -> str:
    """torch's name of a floating dtype given as bf16/fp16/fp32 or bfloat16/float16/half/... ('auto' stays)."""
    import torch

    name = SHORT_DTYPES.get(name, name)
    dtype = getattr(torch, name, None)
    if name != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"unknown dtype {name!r} (auto, bf16, fp16, fp32 or a floating torch dtype name)")
    return name

# The official visual block; `n_queries` is not in the official file (it is 256 there).
DEFAULT_VISUAL: dict[str, Any] = {
    "heads": 16,
    "image_size": 448,
    "image_start_id": 151857,
    "layers": 48,
    "mlp_ratio": 4.9231,
    "output_dim": 4096,
    "patch_size": 14,
    "width": 1664,
}

# Keys of the official config.json in their order, used when qvlq writes a config for the old stack.
OFFICIAL_KEYS = [
    "architectures", "attn_dropout_prob", "auto_map", "bf16", "emb_dropout_prob", "fp16", "fp32",
    "hidden_size", "initializer_range", "intermediate_size", "kv_channels", "layer_norm_epsilon",
    "max_position_embeddings", "model_type", "no_bias", "num_attention_heads", "num_hidden_layers",
    "onnx_safe", "rotary_emb_base", "rotary_pct", "scale_attn_weights", "seq_length",
    "tie_word_embeddings", "tokenizer_type", "torch_dtype", "transformers_version", "use_cache",
    "use_dynamic_ntk", "use_flash_attn", "use_logn_attn", "visual", "vocab_size",
]

OFFICIAL_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}


class QWenConfig(PreTrainedConfig):
    """Config of Qwen-VL / Qwen-VL-Chat (model_type "qwen").

    `auto_map` is kept only so files qvlq writes still load on the old remote-code stack; qvlq never
    imports anything it names. Unknown keys are preserved by PreTrainedConfig.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        emb_dropout_prob: float = 0.0,
        attn_dropout_prob: float = 0.0,
        layer_norm_epsilon: float = 1e-6,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 8192,
        scale_attn_weights: bool = True,
        use_cache: bool = True,
        bf16: bool = False,
        fp16: bool = False,
        fp32: bool = False,
        kv_channels: int = 128,
        rotary_pct: float = 1.0,
        rotary_emb_base: float = 10000,
        use_dynamic_ntk: bool = True,
        use_logn_attn: bool = True,
        use_flash_attn: bool | str = "auto",
        intermediate_size: int = 22016,
        no_bias: bool = True,
        seq_length: int = 2048,
        onnx_safe: bool | None = None,
        tokenizer_type: str = "QWenTokenizer",
        visual: dict[str, Any] | None = None,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.emb_dropout_prob = emb_dropout_prob
        self.attn_dropout_prob = attn_dropout_prob
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.bf16 = bf16
        self.fp16 = fp16
        self.fp32 = fp32
        self.kv_channels = kv_channels
        self.rotary_pct = rotary_pct
        self.rotary_emb_base = rotary_emb_base
        self.use_dynamic_ntk = use_dynamic_ntk
        self.use_logn_attn = use_logn_attn
        self.use_flash_attn = use_flash_attn
        self.intermediate_size = intermediate_size
        self.no_bias = no_bias
        self.seq_length = seq_length
        self.onnx_safe = onnx_safe
        self.tokenizer_type = tokenizer_type
        vis = copy.deepcopy(DEFAULT_VISUAL if visual is None else visual)
        self.visual = vis
        for key in ("dtype", "torch_dtype"):  # AutoModel hands from_pretrained's dtype to the config as well
            if isinstance(kwargs.get(key), str):
                kwargs[key] = dtype_name(kwargs[key])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # Derived geometry, in one place so the vision tower, tokenizer checks and builders agree.
    @property
    def n_queries(self) -> int:
        return int(self.visual.get("n_queries", 256))

    @property
    def image_start_id(self) -> int:
        return int(self.visual["image_start_id"])

    @property
    def image_end_id(self) -> int:
        return self.image_start_id + 1

    @property
    def image_pad_id(self) -> int:
        return self.image_start_id + 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def is_quantized(self) -> bool:
        qc = getattr(self, "quantization_config", None)
        return isinstance(qc, dict) and qc.get("quant_method", "gptq") == "gptq" and "bits" in qc

    def to_official_dict(self, torch_dtype: str) -> dict[str, Any]:
        """The config.json the official repos ship: official keys first, extra keys (e.g.
        quantization_config, visual.n_queries) preserved, HF-internal keys dropped."""
        d = self.to_dict()
        out: dict[str, Any] = {}
        for k in OFFICIAL_KEYS:
            if k == "torch_dtype":
                out[k] = torch_dtype
            elif k == "auto_map":
                out[k] = d.get("auto_map") or dict(OFFICIAL_AUTO_MAP)
            elif k == "architectures":
                out[k] = d.get("architectures") or ["QWenLMHeadModel"]
            elif k == "transformers_version":
                out[k] = d.get("transformers_version")
            else:
                out[k] = getattr(self, k)
        internal = set(PreTrainedConfig().to_dict()) | {"dtype", "_name_or_path"}
        for k, v in d.items():
            if k not in out and k not in internal:
                out[k] = v
        return dict(sorted(out.items()))


def validate_config_dict(d: dict[str, Any], source: str) -> None:
    """Refuse directories that are not Qwen-VL before any weight is touched."""
    if d.get("model_type") != "qwen":
        raise ValueError(f"{source}: model_type is {d.get('model_type')!r}, not 'qwen' (not a Qwen-VL checkpoint)")
    if not isinstance(d.get("visual"), dict):
        raise ValueError(f"{source}: no 'visual' section: this is a text-only Qwen model, not Qwen-VL")
