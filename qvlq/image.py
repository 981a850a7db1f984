"""Image loading and Qwen-VL preprocessing (PIL only: 448 bicubic squash, CLIP mean/std)."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

class ImageLoadError(ValueError):
    """A picture referenced by a prompt or a dataset row could not be read."""


def load_image(source: str | Path | Image.Image, timeout: float = 20.0) -> Image.Image:
    """Open a local path, an http(s) URL or a PIL image as RGB; one clear error on failure."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    src = str(source)
    try:
        if src.startswith(("http://", "https://")):
            with urllib.request.urlopen(src, timeout=timeout) as resp:  # noqa: S310 (user-given URL)
                data = resp.read()
            img = Image.open(io.BytesIO(data))
        else:
            img = Image.open(src)
        img.load()
    except FileNotFoundError:
        raise ImageLoadError(f"image not found: {src}") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise ImageLoadError(f"cannot read image {src}: {type(e).__name__}: {e}") from None
    return img.convert("RGB")


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> normalised float32 tensor [3, size, size] (squash, no crop)."""
    img = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def pixels_for(images: list, size: int) -> torch.Tensor:
    """Paths / URLs / PIL images / [3,S,S] tensors -> one [n, 3, size, size] float32 batch."""
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            if im.shape[-3:] != (3, size, size):
                raise ValueError(f"pixel tensor has shape {tuple(im.shape)}, expected (3, {size}, {size})")
            out.append(im.float())
        else:
            out.append(preprocess(load_image(im), size))
    return torch.stack(out)
