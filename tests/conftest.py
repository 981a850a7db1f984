"""Shared fixtures: one tiny random checkpoint per session (real vocab and image geometry, hidden 128,
2 layers), the model loaded from it in fp32 eval mode, the real tokenizer and a small PNG."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
REFERENCE = (REPO / ".." / "shared" / "reference").resolve()
REAL_VOCAB = REPO / "qvlq" / "assets" / "qwen.tiktoken"


@pytest.fixture(scope="session", autouse=True)
def private_tuning(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tuning results (qvlq.tuning) go to a directory of this session, not the user's: a test never loads what
    another run measured. Compiled kernels stay shared: they are keyed by their source and compiler."""
    from qvlq import tuning

    tuning.DIR = tmp_path_factory.mktemp("qvlq-tuning")
    return tuning.DIR


@pytest.fixture(scope="session")
def reference() -> Path:
    assert REFERENCE.is_dir(), f"reference data missing: {REFERENCE}"
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qvlq.checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint(out, "tiny", seed=0, dtype="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Path):
    """Shared, read-only: tests that toggle eager attention or add hooks must undo it."""
    from qvlq.model.modeling import QWenLMHeadModel

    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype="fp32")
    assert model.dtype == torch.float32 and not model.training
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from qvlq.tokenizer import QWenTokenizer

    return QWenTokenizer(REAL_VOCAB)


@pytest.fixture(scope="session")
def image_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64x48 RGB PNG with structure in every channel (so the vision tower sees a real signal)."""
    yy, xx = np.mgrid[0:48, 0:64]
    arr = np.stack([xx * 4, yy * 5, (xx * yy) % 256], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture(scope="session")
def image_prompt(tokenizer, image_file: Path) -> Callable[..., torch.Tensor]:
    """ids [1, L] of "Picture 1: <img>path</img>\\n{text}" (258 image tokens)."""

    def make(text: str = "What is in this picture?", path: str | Path | None = None) -> torch.Tensor:
        p = image_file if path is None else path
        return torch.tensor([tokenizer.encode_text(f"Picture 1: <img>{p}</img>\n{text}")])

    return make


@pytest.fixture(scope="session")
def image_feats(tiny_model, image_file: Path) -> torch.Tensor:
    """The tiny vision tower's features of image_file, [1, 256, 128] (computed once)."""
    from qvlq.image import pixels_for

    with torch.no_grad():
        return tiny_model.transformer.visual(pixels_for([image_file], 448))


@pytest.fixture(scope="session")
def tiny_variant(tiny_model) -> Callable[..., torch.nn.Module]:
    """A model sharing the tiny weights (no copy) with config overrides, e.g. seq_length=16."""
    from qvlq.model.config import QWenConfig
    from qvlq.model.modeling import QWenLMHeadModel

    def make(**overrides) -> torch.nn.Module:
        cfg = QWenConfig(**{**tiny_model.config.to_dict(), **overrides})
        with torch.device("meta"):
            m = QWenLMHeadModel(cfg)
        m.load_state_dict(tiny_model.state_dict(), assign=True)
        return m.eval()

    return make


@pytest.fixture
def one_torch_thread():
    """One torch thread: on small shared boxes a spinning pool is ~10x slower, and one thread makes
    in-process results bit-identical to OMP_NUM_THREADS=1 subprocesses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_interpreted(test_file: str) -> dict:
    """Run `python test_file --interpret` with TRITON_INTERPRET=1 (it must be set before triton is imported,
    hence a subprocess) and return the JSON dict it prints last: case -> None or what went wrong."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(Path(test_file).resolve()), "--interpret"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ Triton compiler
def triton_cubin(
    kernel, sig: dict[str, str], constexprs: dict, options: dict, arch: int, divisible: tuple[str, ...] = (),
    asm: str = "cubin",
) -> bytes | str:
    """A @triton.jit kernel compiled for sm_<arch> without a GPU or driver: its cubin, or asm="ptx". sig:
    argument -> Triton type (arguments not named are constexprs). Pointers, `stride` arguments and those in
    `divisible` are marked multiples of 16, as Triton's JIT specializes them at full size (it is what makes
    16-byte loads)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    sig = {n: sig.get(n, "constexpr") for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n.endswith("_ptr") or "stride" in n or n in divisible
    }
    src = ASTSource(kernel, sig, constexprs={k: v for k, v in constexprs.items() if k in names}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm[asm]


def cuobjdump(flag: str, cubin: bytes) -> str:
    """cuobjdump (Triton's copy) on a cubin: -sass, -res-usage..."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"qvlq-test-{os.getpid()}.cubin"
    path.write_bytes(cubin)
    try:
        return subprocess.run([str(tool), flag, str(path)], capture_output=True, text=True, check=True).stdout
    finally:
        path.unlink()


def cubin_resources(cubin: bytes) -> str:
    """cuobjdump's resource line (REG, STACK, LOCAL...)."""
    return next(line.strip() for line in cuobjdump("-res-usage", cubin).splitlines() if "REG:" in line)


def sass_main_loop(cubin: bytes) -> list[str]:
    """The SASS instructions of the kernel's longest loop (the span of its longest backward branch)."""
    code = []
    for line in cuobjdump("-sass", cubin).splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2)))
    spans = [(int(b.group(1), 16), addr) for addr, text in code if (b := re.search(r"\bBRA\b.*0x([0-9a-f]+)", text))]
    lo, hi = max((s for s in spans if s[0] < s[1]), key=lambda s: s[1] - s[0])
    return [text for addr, text in code if lo <= addr <= hi]
