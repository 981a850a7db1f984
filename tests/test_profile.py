"""qvlq profile: statistics, the bandwidth bound, weight accounting, the tiny random-weight profile end to end
(library and CLI), NVML absence, OOM in one cell, budget skips and the full-size refusal on CPU."""

import json
import math
import sys
import types

import pytest
import torch
from typer.testing import CliRunner

import qvlq.profile as prof
from qvlq.cli import app
from qvlq.measure import MemorySampler, bound_tok_s, downsample, latency_stats, percentile, probe_nvml
from qvlq.profile import ProfileRefused, ProfileSettings, protocol_bound, run_profile
from qvlq.profile_report import report_tables, write_report
from qvlq.random_model import rtn_quantize

# The image prompt is 258 tokens + template and text (289 in all): 292 -> 34 new tokens.
TINY = {"random_weights": "tiny", "device": "cpu", "runs": [1], "warmup_tokens": 4, "crosscheck_tokens": 8}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    pass


# ------------------------------------------------------------------------------------ statistics
def test_percentiles_and_latency_stats():
    x = [float(i) for i in range(1, 101)]
    assert percentile(x, 50) == pytest.approx(50.5)
    assert percentile(x, 90) == pytest.approx(90.1)
    assert percentile(x, 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    s = latency_stats([10.0, 12.0, 14.0])
    assert (s.n, s.mean_ms, s.p50_ms, s.min_ms, s.max_ms) == (3, 12.0, 12.0, 10.0, 14.0)
    assert s.stdev_ms == pytest.approx(2.0)
    assert latency_stats([5.0]).stdev_ms == 0.0
    assert latency_stats([]).n == 0


def test_downsample_keeps_means():
    pos, vals = downsample(list(range(1000)), max_points=10)
    assert len(pos) == len(vals) == 10
    assert vals[0] == pytest.approx(49.5) and pos[0] == pytest.approx(49.5)
    assert downsample([1.0, 2.0], 10) == ([0.0, 1.0], [1.0, 2.0])


@pytest.mark.parametrize(
    ("gpu", "precision", "context", "expected"),
    [
        ("A100", "bf16", 2048, 138), ("A100", "bf16", 8192, 124), ("A100", "int4", 2048, 391),
        ("A100", "int4", 8192, 299), ("H100", "bf16", 2048, 226), ("H100", "bf16", 8192, 204),
        ("H100", "int4", 2048, 643), ("H100", "int4", 8192, 491),
    ],
)  # fmt: skip
def test_bound_reproduces_protocol_table(gpu, precision, context, expected):
    assert protocol_bound(gpu, precision, context) == pytest.approx(expected, rel=0.02)


def test_bound_formula():
    # no KV: bandwidth / weights; KV at the mean context of the run
    assert bound_tok_s(1000.0, 10e9, 0, 0, 100) == pytest.approx(100.0)
    assert bound_tok_s(1000.0, 10e9, 1e6, 0, 10_000) == pytest.approx(1000e9 / (10e9 + 5e9))


def test_full_size_accounting_matches_protocol():
    """Bytes read per decoded token from the real geometry (meta model): 14.20 GB BF16, 4.61 GB Int4."""
    from qvlq.checkpoint import preset_config

    cfg = preset_config("full")
    bf16 = prof._meta_accounting(cfg, False, torch.bfloat16)
    int4 = prof._meta_accounting(cfg, True, torch.bfloat16)
    assert bf16.linear_params == pytest.approx(6.476e9, rel=1e-3)
    assert bf16.read_bytes_per_token / 1e9 == pytest.approx(14.20, rel=0.005)
    assert int4.read_bytes_per_token / 1e9 == pytest.approx(4.61, rel=0.005)
    assert int4.bits_per_weight_linears == pytest.approx(4.156, abs=0.001)
    assert bf16.bits_per_weight_linears == 16.0
    assert bf16.kv_bytes_per_token == 2**19  # 0.5 MiB per context token


def test_rtn_quantize_is_official_sym_layout():
    from qvlq.int4 import QuantLinear, pack_gptq_v1

    w = torch.randn(64, 256) * 0.02
    codes, scales, zeros, g_idx = rtn_quantize(w, 4, 128)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    assert scales.shape == (2, 64) and bool((zeros == 8).all())
    packed = pack_gptq_v1(codes, scales, zeros, g_idx, bits=4)
    assert bool((packed["qzeros"] == 0x77777777).all())  # sym: every qzeros word as in the official Int4
    ql = QuantLinear(256, 64)
    for k, v in packed.items():
        getattr(ql, k).copy_(v)
    err = (ql.dequantize() - w).abs()
    # round to nearest; +max|w| sits at 7.5 steps and clamps to 7 (the fp16 scale adds a hair)
    assert bool((err <= scales[g_idx.long()].T * 0.51).all())


# ------------------------------------------------------------------------------------ end to end
def test_tiny_profile_end_to_end(tmp_path):
    s = ProfileSettings(**TINY, contexts=[292], engines=["hf", "fast"], precisions=["bf16", "int4"],
                        windowed=[("hf", 292)], window_tokens=4, window_points=2)  # fmt: skip
    report = run_profile(s)
    assert [(c.precision, c.engine, c.mode, c.status) for c in report.speed] == [
        ("bf16", "hf", "windowed", "ok"), ("bf16", "fast", "full", "ok"),
        ("int4", "hf", "windowed", "ok"), ("int4", "fast", "full", "ok"),
    ]  # fmt: skip
    for c in report.speed:
        assert c.new_tokens == 292 - 258 and c.prompt_tokens == 289 and c.runs == 1
        assert c.decode_tok_s > 0 and c.e2e_tok_s > 0 and c.ttft_ms > 0 and c.prefill_tok_s > 0
        assert c.e2e_tok_s < c.decode_tok_s  # e2e includes the prefill
        assert c.latency.p50_ms <= c.latency.p99_ms and c.bound_tok_s > 0 and c.pct_of_bound > 0
        # full: every decode step; windowed: window_points x window_tokens steps
        assert c.latency.n == (c.new_tokens - 1 if c.mode == "full" else 2 * 4)
    cells = {(m.precision, m.engine, m.cell) for m in report.memory}
    assert ("int4", "fast", "encode 292") in cells and ("bf16", "hf", "generate 292") in cells
    for m in report.memory:  # CPU: host RSS only, NVML and allocator figures absent
        assert m.status == "ok" and m.host_rss_bytes > 0 and m.nvml_process_bytes is None and m.allocated_bytes is None
    bf16, int4 = report.models
    assert bf16.random_weights and bf16.bits_per_weight_linears == 16.0 and bf16.dtype == "bfloat16"
    assert int4.bits_per_weight_linears == pytest.approx(4.156, abs=0.001) and int4.dtype == "float16"
    assert sum(int4.int4_backends.values()) == 2 * 5  # every block linear is a QuantLinear
    assert [(x.precision, x.compared) for x in report.crosschecks] == [("bf16", 8), ("int4", 8)]
    assert set(report.engines) == {f"{p}/{e}@292" for p in ("bf16", "int4") for e in ("hf", "fast")}
    assert report.engines["int4/fast@292"]["engine"] == "fast"
    assert any("RANDOM" in n for n in report.notes)

    out = write_report(report, tmp_path / "r")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["memory.png", "report.json", "report.md", "report.svg", "speed.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # atomic: no temp dirs left
    data = json.loads((out / "report.json").read_text())
    assert data["speed"][0]["decode_tok_s"] > 0 and data["environment"]["nvml"].startswith("n/a")
    md = (out / "report.md").read_text()
    assert "WEIGHTS ARE RANDOM" in md and "| bf16 | hf |" in md and "n/a" in md
    assert (out / "report.svg").read_text().lstrip().startswith("<svg")
    for png in ("speed.png", "memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_engine_is_checked_against_a_reference_run():
    """Without the hf engine, each fast cell's leading tokens are compared with one short HF-loop run per
    precision on the same prompt (the same first tokens at every context)."""
    s = ProfileSettings(**TINY, contexts=[292, 296], engines=["fast"], precisions=["bf16", "int4"])
    report = run_profile(s)
    got = [(x.precision, x.context, x.engines, x.compared, x.agree) for x in report.crosschecks]
    assert got == [(p, c, ["fast", prof.REFERENCE], 8, 8) for p in ("bf16", "int4") for c in (292, 296)]
    assert [c.status for c in report.speed] == ["ok"] * 4
    # the reference run's smallest top-2 gap over the compared tokens, a fraction of its largest |logit| (0: bf16
    # rounding makes exact ties in this tiny random model)
    assert all(x.note == "identical" and 0 <= x.reference_margin < 1 for x in report.crosschecks)


def test_crosscheck_note_says_whether_a_divergence_was_a_near_tie():
    assert prof.crosscheck_note(None, 0.3) == "identical"
    assert "a near-tie" in prof.crosscheck_note(5, prof.NEAR_TIE / 2)
    assert "NOT a near-tie" in prof.crosscheck_note(5, 0.1) and "token 5" in prof.crosscheck_note(5, 0.1)
    assert "no reference logits" in prof.crosscheck_note(5, None)


def test_cli_profile_json(tmp_path):
    out = tmp_path / "cli"
    args = ["profile", "--random-weights", "tiny", "--precisions", "int4", "--engine", "hf", "--contexts", "292",
            "--runs", "1", "--warmup-tokens", "4", "--device", "cpu", "--json", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [c["status"] for c in data["speed"]] == ["ok"]
    assert data["models"][0]["precision"] == "int4" and data["settings"]["contexts"] == [292]
    assert data["settings"]["int4_kernel"] == "fastest"  # the default: measured per shape (dequant on CPU)
    assert data["settings"]["attention"] == "fastest"  # likewise; SDPA on the CPU
    assert set(data["models"][0]["int4_backends"]) == {"dequant"}
    assert (out / "report.md").is_file() and (out / "speed.png").is_file()
    assert "(requested: fastest)" in (out / "report.md").read_text()
    # an existing report is not replaced without --overwrite
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output

    # --render: the same report.json rendered again, nothing run
    again = CliRunner().invoke(app, ["profile", "--render", str(out / "report.json"), "--out", str(tmp_path / "re")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "re" / "report.md").read_text() == (out / "report.md").read_text()
    assert json.loads((tmp_path / "re" / "report.json").read_text()) == data
    assert (tmp_path / "re" / "speed.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text('{"speed": []}')
    bad = CliRunner().invoke(app, ["profile", "--render", str(tmp_path / "bad.json"), "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "not a qvlq profile report.json" in bad.output and not (tmp_path / "b").exists()
    no_out = CliRunner().invoke(app, ["profile", "--render", str(out / "report.json")])
    assert no_out.exit_code == 2 and "needs --out" in no_out.output


def test_int4_kernel_option_is_validated_and_follows_the_environment(tmp_path, monkeypatch):
    args = ["profile", "--random-weights", "tiny", "--device", "cpu", "--out", str(tmp_path / "x")]
    bad = CliRunner().invoke(app, [*args, "--int4-kernel", "marlin"])
    assert bad.exit_code == 2 and "--int4-kernel must be one of" in bad.output
    cpu = CliRunner().invoke(app, [*args, "--int4-kernel", "mma"])
    assert cpu.exit_code == 2 and "--int4-kernel mma needs a CUDA device" in cpu.output
    assert not (tmp_path / "x").exists()  # refused before anything was written
    monkeypatch.setenv("QVLQ_INT4_BACKEND", "bogus")
    env = CliRunner().invoke(app, args)
    assert env.exit_code != 0 and "QVLQ_INT4_BACKEND='bogus'" in env.output


def test_attention_option(tmp_path):
    """--attention reaches the fast engine and the report; it does not combine with --kv-block's buckets."""
    out = tmp_path / "a"
    args = ["profile", "--random-weights", "tiny", "--precisions", "bf16", "--engine", "fast", "--contexts", "292",
            "--runs", "1", "--warmup-tokens", "4", "--device", "cpu", "--json", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--attention", "triton"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["settings"]["attention"] == "triton" and [c["status"] for c in data["speed"]] == ["ok"]
    assert data["engines"]["bf16/fast@292"]["attention"].startswith("triton split-KV")
    assert "requested triton; bf16/fast@292: triton split-KV" in (out / "report.md").read_text()
    both = CliRunner().invoke(app, [*args, "--attention", "fastest", "--kv-block", "64", "--overwrite"])
    assert both.exit_code == 2 and "use --attention sdpa with --kv-block" in both.output
    bad = CliRunner().invoke(app, [*args, "--attention", "flash", "--overwrite"])
    assert bad.exit_code == 2 and "--attention must be one of" in bad.output
    bad = CliRunner().invoke(app, [*args, "--fuse", "all", "--overwrite"])
    assert bad.exit_code == 2 and "--fuse must be one of block, mlp, off" in bad.output
    off = CliRunner().invoke(app, [*args, "--fuse", "off", "--precisions", "int4", "--overwrite"])
    assert off.exit_code == 0, off.output
    data = json.loads(off.stdout)
    assert data["settings"]["fuse"] == "off"  # (CPU: no mma layers, so nothing is fused either way)
    assert {"fused_mlp", "fused_blocks", "fused_block_off"} <= set(data["engines"]["int4/fast@292"])


def test_contexts_shorter_than_the_image_prompt_are_refused():
    with pytest.raises(ProfileRefused, match="too short"):
        run_profile(ProfileSettings(**TINY, contexts=[64, 128]))


# ------------------------------------------------------------------------------------ failure paths
def test_nvml_absent_is_na(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    p = probe_nvml(torch.device("cuda"))
    assert p.status.startswith("n/a") and p.device_used() is None and p.process_used(1) is None
    broken = types.ModuleType("pynvml")

    def fail():
        raise RuntimeError("NVML Shared Library Not Found")

    broken.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert "NVML Shared Library Not Found" in probe_nvml(torch.device("cuda")).status
    with MemorySampler(torch.device("cpu"), p, interval_s=0.01) as ms:
        torch.ones(1000).sum()
    assert ms.reading.nvml_process is None and ms.reading.nvml_device is None and ms.reading.host_rss > 0


def test_oom_in_one_cell_is_reported_and_the_rest_runs(monkeypatch):
    real = prof.timed_generate

    def flaky(engine, ids, pixels, n_new, device, deadline=None):
        if n_new == 296 - 258:  # the measured run of the 296 cell (warm-ups are shorter)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(engine, ids, pixels, n_new, device, deadline)

    monkeypatch.setattr(prof, "timed_generate", flaky)
    report = run_profile(ProfileSettings(**TINY, contexts=[292, 296], engines=["hf"], precisions=["bf16"]))
    status = {c.context: c.status for c in report.speed}
    assert status == {292: "ok", 296: "OOM"}
    mem = {m.cell: m.status for m in report.memory}
    assert mem == {"encode 292": "ok", "generate 292": "ok", "encode 296": "ok", "generate 296": "OOM"}
    main = report_tables(report)[0]
    assert "OOM" in main.rows[0][3] and main.rows[0][2] != "OOM"


def test_attention_row_names_cells_with_the_same_attention_together():
    from qvlq.profile_report import _attention_text

    engines = {
        "bf16/fast@2048": {"engine": "fast", "attention": "triton split-KV over slots 0..pos, b8s32w4"},
        "bf16/hf@2048": {"engine": "hf", "attention": "SDPA (model default)"},
        "int4/fast@2048": {"engine": "fast", "attention": "triton split-KV over slots 0..pos, b8s32w4"},
        "int4/fast@8192": {"engine": "fast", "attention": "sdpa over the static cache, mask k_index <= pos"},
    }
    assert _attention_text(types.SimpleNamespace(engines=engines)) == (
        "bf16/fast@2048, int4/fast@2048: triton split-KV over slots 0..pos, b8s32w4; "
        "int4/fast@8192: sdpa over the static cache, mask k_index <= pos"
    )


def test_fused_launch_row_lists_the_timed_blocks_fastest_first():
    from qvlq.profile_report import _fused_text

    rec = {"in_features": 4096, "out_features": 22016, "variant": "norm-glu", "choice": "w2t1s4-norm-glu",
           "configs_us": {"w4t1-norm-glu": 16.04, "w2t1s4-norm-glu": 15.51}}  # fmt: skip
    assert _fused_text(rec) == "4096->22016 norm-glu: w2t1s4-norm-glu 15.5, w4t1-norm-glu 16.0 us -> w2t1s4-norm-glu"


def test_budget_skips_cells_instead_of_overrunning():
    s = ProfileSettings(**TINY, contexts=[292], engines=["hf"], precisions=["bf16"], max_seconds=0.001)
    report = run_profile(s)
    assert [c.status for c in report.speed] == ["skipped: budget"]
    assert {m.status for m in report.memory} == {"skipped: budget"}
    assert report_tables(report)[0].rows[0][2] == "skipped: budget"


def test_full_size_on_cpu_is_refused_with_an_estimate():
    with pytest.raises(ProfileRefused, match=r"refused: .* GB/s .* s/token.* h; run it on a GPU"):
        run_profile(ProfileSettings(random_weights="full", device="cpu"))
    result = CliRunner().invoke(app, ["profile", "--random-weights", "full", "--device", "cpu"])
    assert result.exit_code == 2
    assert "full-size profile on CPU refused" in result.output and "Traceback" not in result.output


def test_nvml_readings_are_sampled(monkeypatch):
    """With an NVML that answers, the sampler keeps the peak device and process figures (this pid only)."""
    import os

    fake = types.ModuleType("pynvml")
    used = iter(range(1_000, 10_000_000, 1_000))
    fake.nvmlInit = lambda: None
    fake.nvmlDeviceGetHandleByUUID = lambda uuid: "handle"
    fake.nvmlDeviceGetHandleByIndex = lambda i: "handle"
    fake.nvmlSystemGetDriverVersion = lambda: "555.42"
    fake.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=next(used))
    fake.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=10**12),  # another process: ignored
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=123_456),
    ]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    p = probe_nvml(torch.device("cuda"))
    assert p.status == "ok" and p.driver == "555.42"
    with MemorySampler(torch.device("cpu"), p, interval_s=0.005) as ms:
        import time

        time.sleep(0.05)
    assert ms.reading.nvml_process == 123_456 and ms.reading.nvml_device >= 3_000


def test_unexpected_error_in_one_cell_is_reported(monkeypatch):
    real = prof.make_engine

    def broken(name, model, max_seq_len, fast_options=None):
        if name == "fast":
            raise RuntimeError("inductor exploded")
        return real(name, model, max_seq_len, fast_options)

    monkeypatch.setattr(prof, "make_engine", broken)
    s = ProfileSettings(**TINY, contexts=[292], engines=["fast", "hf"], precisions=["bf16"],
                        windowed=[("hf", 292)], window_tokens=2, window_points=2)  # fmt: skip
    report = run_profile(s)
    status = {c.engine: c.status for c in report.speed}
    assert status == {"fast": "error: RuntimeError: inductor exploded", "hf": "ok"}
    assert report.crosschecks == []  # nothing to compare against


def test_rich_tables_show_cells_as_plain_text():
    """A kernel choice reads "mma 9.4 us [w4t1]": rich must not take "[w4t1]" for markup and drop it."""
    import io

    from rich.console import Console

    from qvlq.report import TableSpec, render_rich

    con = Console(record=True, width=120, file=io.StringIO())
    for t in render_rich([TableSpec("choice [a]", ["kernel [b]"], [["mma 9.4 us [w4t1] -> mma"]], "note [c]")]):
        con.print(t)
    text = con.export_text()
    for s in ("choice [a]", "kernel [b]", "mma 9.4 us [w4t1] -> mma", "note [c]"):
        assert s in text


def test_memory_table_gives_peak_over_weights_and_kv():
    """The issue's "within 5% of weights + KV cache", per memory cell, from a committed GPU report: the fast
    engine's static cache as allocated, the hf engine's cache at the cell's context."""
    import dataclasses
    from pathlib import Path

    from qvlq.profile_report import load_report, weights_kv_ratio

    report = load_report(Path(__file__).parents[1] / "reports/profile/h100-compiled-full-2026-11-27/report.json")
    cell = next(m for m in report.memory if (m.precision, m.engine, m.cell) == ("int4", "fast", "encode 2048"))
    int4 = next(m for m in report.models if m.precision == "int4")
    kv = report.engines["int4/fast@2048"]["kv_cache_bytes"]
    assert kv == 32 * 2 * 2079 * 4096 * 2  # 32 layers, K and V, 2079 slots, 4096 values, 16-bit
    want = cell.allocated_bytes / (int4.resident_bytes + kv)
    assert weights_kv_ratio(report, cell) == pytest.approx(want) and 1.0 < want < 1.05
    mem = next(t for t in report_tables(report) if t.title.startswith("Peak memory"))
    col = mem.columns.index("alloc / (weights + KV)")
    assert [r[col] for r in mem.rows if r[:3] == ["int4", "fast", "encode 2048"]] == [f"{want:.3f}"]

    hf = dataclasses.replace(cell, engine="hf")  # no static cache: KV of the cell's context
    assert weights_kv_ratio(report, hf) == pytest.approx(
        cell.allocated_bytes / (int4.resident_bytes + int4.kv_bytes_per_token * 2048))
    assert weights_kv_ratio(report, dataclasses.replace(cell, allocated_bytes=None)) is None  # CPU cells


def test_int4_ratios_pair_each_cell_with_the_float_model():
    """Int4 against BF16 per engine and context, from the committed H100 report (2.32x at 2048: the figure the
    notes computed by hand), with the seed's ratios beside them; a missing baseline cell gives no row."""
    import dataclasses
    from pathlib import Path

    from qvlq.profile_report import int4_ratios, load_report, report_json

    report = load_report(Path(__file__).parents[1] / "reports/profile/h100-compiled-full-2026-11-27/report.json")
    got = {(r.engine, r.context): r for r in int4_ratios(report)}
    assert set(got) == {("fast", 2048), ("fast", 8192)}
    speed = {(c.precision, c.context): c for c in report.speed}
    r = got["fast", 2048]
    assert r.decode_speedup == pytest.approx(speed["int4", 2048].decode_tok_s / speed["bf16", 2048].decode_tok_s)
    assert round(r.decode_speedup, 2) == 2.32 and r.complete and 0.5 < r.encode_memory < 0.6
    assert not got["fast", 8192].complete  # BF16 at 8192 stopped on the time budget (partial)
    table = next(t for t in report_tables(report) if t.title.startswith("Int4 against"))
    assert table.rows[0][:4] == ["int4 / bf16", "fast", "2048", "2.32x"] and table.rows[1][3] == "2.10x *"
    assert [row[3] for row in table.rows[2:]] == ["1.31x", "1.41x"]  # the seed: 37.79 / 28.87, 34.34 / 24.32
    assert [x["decode_speedup"] for x in report_json(report)["int4_ratios"]] == [
        got["fast", 2048].decode_speedup, got["fast", 8192].decode_speedup]

    alone = dataclasses.replace(report, speed=[c for c in report.speed if (c.precision, c.context) != ("bf16", 8192)])
    assert [(r.engine, r.context) for r in int4_ratios(alone)] == [("fast", 2048)]
    assert int4_ratios(dataclasses.replace(report, models=report.models[1:])) == []  # no float model
