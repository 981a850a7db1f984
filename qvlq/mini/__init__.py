"""qvlq-mini: a small Qwen-VL and the synthetic multimodal task suite it is trained and scored on."""
