"""Merging a peft LoRA adapter into base weights as they stream from the shards (the fine-tuned case).

Only the adapter's data files are read (adapter_config.json + adapter_model.safetensors, or .bin through
weights_only): W' = W + scale * B @ A, scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


class LoraAdapter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg_path = self.path / "adapter_config.json"
        if not cfg_path.is_file():
            raise ValueError(f"{self.path}: no adapter_config.json (not a peft LoRA adapter)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{self.path}: peft_type {cfg.get('peft_type')!r} is not LORA")
        if cfg.get("fan_in_fan_out"):
            raise ValueError(f"{self.path}: fan_in_fan_out adapters are not supported")
        r = int(cfg["r"])
        alpha = float(cfg.get("lora_alpha", r))
        self.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        st, binf = self.path / "adapter_model.safetensors", self.path / "adapter_model.bin"
        if st.is_file():
            tensors, self.file = load_file(str(st)), st
        elif binf.is_file():
            tensors, self.file = torch.load(binf, map_location="cpu", weights_only=True), binf
        else:
            raise ValueError(f"{self.path}: no adapter_model.safetensors or adapter_model.bin")
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                if ".lora_B." not in key:
                    raise ValueError(f"{self.path}: unsupported adapter tensor {key} (only LoRA A/B of linears)")
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            self.pairs[f"{module}.weight"] = (a, b)
        if not self.pairs:
            raise ValueError(f"{self.path}: the adapter holds no LoRA weights")

    def fingerprint(self) -> str:
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    def targets(self) -> set[str]:
        return set(self.pairs)

    def merge(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """weight with this adapter's delta added (in fp32, cast back), or unchanged if not targeted."""
        pair = self.pairs.get(name)
        if pair is None:
            return weight
        a, b = (t.to(weight.device, torch.float32) for t in pair)
        if (b.shape[0], a.shape[1]) != tuple(weight.shape):
            shape = (b.shape[0], a.shape[1])
            raise ValueError(f"adapter delta for {name} has shape {shape}, the weight {tuple(weight.shape)}")
        return (weight.float() + self.scale * (b @ a)).to(weight.dtype)
