"""The diagnostics of reports/profile/h100-fused-pdl-2026-11-27/diagnostics/ (CUDA).

  fused: tests/test_fast.py's tiny mma model (2 layers, NTK alpha 63, logN), fed the HF loop's 8 greedy
         tokens; per engine kind and fusion level, the fast engine's logits against the HF loop's at each
         step, as a fraction of the largest |logit|. Run it again with QVLQ_PDL=0 for the A/B of PDL.
  store: whether safetensors gives CUDA tensors their own storage, and whether mapping a loaded
         checkpoint's embedding table into host memory gives its device memory back.

    python benchmarks/fused_logits.py fused --out diag-fused.json [--only inductor-block,manual-block]
"""

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

VARIANTS = {  # FastEngine keyword arguments
    "inductor-block": dict(compile="auto"),
    "inductor-mlp": dict(compile="auto", fuse_block=False),
    "inductor-nofuse": dict(compile="auto", fuse_mlp=False),
    "manual-block": dict(compile=False, cuda_graphs=True),
}


def fused(only: list[str] | None) -> dict:
    from test_fast import greedy, image, mma_model, prompt, teacher_forced

    from qvlq.fast import FastEngine
    from qvlq.generate import HFEngine
    from qvlq.int4_mma import Config

    out = {}
    for name, kw in VARIANTS.items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        model = mma_model(16, layers=2, dtype=torch.bfloat16, device="cuda", config=Config(4, 1))
        ids = prompt(model.config).cuda()
        with torch.no_grad():
            feats = model.transformer.encode_images(image().to("cuda", torch.bfloat16))
        tokens, ref = greedy(HFEngine(model), ids, steps=8, image_features=feats)
        engine = FastEngine(model, 320, attention="sdpa", **kw)
        got = teacher_forced(engine, ids, tokens, image_features=feats)
        rel = ((got - ref).abs().amax(dim=(1, 2)) / ref.abs().max()).tolist()
        d = engine.describe()
        out[name] = {"rel_per_step": [round(r, 4) for r in rel],
                     "describe": {k: d[k] for k in ("int4_backend", "fused_mlp", "fused_mlp_gate", "fused_blocks")}}
        print(name, json.dumps(out[name]), flush=True)
    return out


def store() -> dict:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qvlq.checkpoint import init_checkpoint
    from qvlq.model.modeling import QWenLMHeadModel
    from qvlq.model.stream import host_embedding

    tmp = Path(tempfile.mkdtemp())
    save_file({"a": torch.randn(1000, 1000), "b": torch.randn(1000, 1000)}, str(tmp / "t.safetensors"))
    with safe_open(str(tmp / "t.safetensors"), framework="pt", device="cuda") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    out = {"safetensors_cuda": {"a_storage_bytes": a.untyped_storage().nbytes(), "a_bytes": a.nbytes,
                                "same_storage": a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()}}
    before = torch.cuda.memory_allocated()
    del a
    out["safetensors_cuda"]["freed_by_del_a"] = before - torch.cuda.memory_allocated()
    init_checkpoint(tmp / "tiny", "tiny", seed=0, dtype="fp32")
    model = QWenLMHeadModel.from_pretrained(tmp / "tiny", device=torch.device("cuda"), dtype="fp32")
    out["wte"] = {"bytes": model.transformer.wte.weight.nbytes}
    before = torch.cuda.memory_allocated()
    host_embedding(model)
    gc.collect()
    out["wte"]["freed"] = before - torch.cuda.memory_allocated()
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["fused", "store"])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", help="comma-separated variants of `fused` (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("fused_logits.py needs CUDA")
    result = fused(args.only.split(",") if args.only else None) if args.what == "fused" else store()
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
