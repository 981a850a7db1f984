"""`qvlq demo` end to end on the shipped qvlq-mini, in a reduced size (few samples, short contexts)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from qvlq.cli import app
from qvlq.demo import DemoOptions, default_model_dir, display_path, run_demo


def test_shipped_checkpoint_is_official_layout() -> None:
    d = default_model_dir()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "qwen.tiktoken",
                 "model.safetensors.index.json", "train_log.json"):  # fmt: skip
        assert (d / name).is_file(), name
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size <= 20_000_000


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = run_demo(DemoOptions(out=str(out), n_calib=6, n_eval=12, max_len=256, profile_contexts=(112, 128)))
    for name in ("report.md", "report.json", "report.svg", "profile/report.md", "compare/report.md"):
        assert (out / name).is_file(), name
    names = [v.name for v in res.variants]
    assert names == ["bf16", "int4-gptq", "int4-gptq-text", "int4-rtn"]
    assert all(0.0 <= v.accuracy["all"]["accuracy"] <= 1.0 and v.accuracy["all"]["n"] == 12 for v in res.variants)
    # GPTQ's proxy loss is below RTN's on the same Hessians for the calibrated variants
    q = res.quantize_losses
    assert q["int4-gptq"]["gptq_loss"] < q["int4-gptq"]["rtn_loss"]
    assert res.calibration["images"] > 0 and res.calibration["image_token_share"] > 0
    assert {"precision", "engine", "context", "decode_tok_s", "status"} <= set(res.profile_summary[0])
    assert json.loads((out / "report.json").read_text())["model"] == display_path(default_model_dir())
    assert set(res.seconds) == {"calibrate", "quantize", "chat", "profile", "compare", "report"}
    import torch

    assert res.environment["device"] == "cpu" and res.environment["torch"] == torch.__version__
    assert f"- ran on the CPU ({res.environment['cpu']}" in (out / "report.md").read_text()


def test_demo_cli_bad_model(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["demo", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert not (tmp_path / "o").exists()


def test_shipped_checkpoint_meets_its_committed_eval() -> None:
    """Re-score the shipped files on the held-out split its train_log.json reports; greedy fp32
    decoding only differs by summation order here, so the per-task accuracies must agree closely."""
    import torch

    from qvlq.mini.evaluate import evaluate_tasks
    from qvlq.mini.tasks import generate_suite
    from qvlq.model.loading import load_model_and_tokenizer

    d = default_model_dir()
    logged = json.loads((d / "train_log.json").read_text())["final_eval"]
    model, tok = load_model_and_tokenizer(d, device="cpu", dtype="fp32")
    samples = generate_suite(logged["n"], seed=logged["seed"], split=logged["split"])
    with torch.inference_mode():
        res = evaluate_tasks(model, tok, samples, method=logged["method"], n_boot=50)
    for task, s in logged["scores"].items():
        assert res.scores[task]["n"] == s["n"], task
        assert abs(res.scores[task]["accuracy"] - s["accuracy"]) <= 1.5 / s["n"] + 1e-9, task  # one flip
