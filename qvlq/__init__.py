"""qvlq: Qwen-VL-Chat on today's stack.

Importing qvlq registers the native Qwen-VL classes with transformers' Auto* factories under
model_type "qwen", so `AutoModelForCausalLM.from_pretrained(dir)` and `AutoTokenizer.from_pretrained(dir)`
work on official-layout directories without trust_remote_code (their auto_map is never executed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .model.config import QWenConfig
from .model.modeling import QWenLMHeadModel, QWenModel
from .tokenizer import QWenTokenizer

__version__ = "0.1.0"

AutoConfig.register("qwen", QWenConfig, exist_ok=True)
AutoModel.register(QWenConfig, QWenModel, exist_ok=True)
AutoModelForCausalLM.register(QWenConfig, QWenLMHeadModel, exist_ok=True)
AutoTokenizer.register(QWenConfig, tokenizer_class=QWenTokenizer, exist_ok=True)

__all__ = ["QWenConfig", "QWenLMHeadModel", "QWenModel", "QWenTokenizer", "__version__"]
