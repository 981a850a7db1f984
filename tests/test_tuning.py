"""qvlq.tuning: tuning results kept on disk per device and software. The tuners time on CUDA only, so these
tests give the CPU a fingerprint and count the tuner's calls: one per key, however many processes (the
in-process memos cleared) ask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qvlq import decode_attention, int4, int4_mma, tuning
from qvlq.int4 import QuantLinear

CPU = torch.device("cpu")


@pytest.fixture
def disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "DIR", None)  # the session's directory (conftest) aside: QVLQ_CACHE_DIR decides
    monkeypatch.setattr(tuning, "fingerprint", lambda device: "Test GPU sm9.0 torch x")
    monkeypatch.setattr(tuning, "LOADED", [])
    return tmp_path


class Counting:
    def __init__(self, value: object) -> None:
        self.value, self.calls = value, 0

    def __call__(self) -> object:
        self.calls += 1
        return self.value


def test_a_result_is_tuned_once_per_key_and_loaded_after(disk: Path) -> None:
    tune = Counting({"choice": 3})
    args = (CPU, tune, dict, dict)
    assert tuning.remember("k", (1, "a"), *args) == {"choice": 3} and tune.calls == 1
    assert tuning.remember("k", (1, "a"), *args) == {"choice": 3} and tune.calls == 1  # another process's view
    assert tuning.LOADED == ['k [1, "a"]']
    assert tuning.summary(['k [1, "a"]', "k [2]", 'other [1, "a"]']) == "k x2, other x1"  # the profile's note
    tuning.remember("k", (2, "a"), *args)  # another key, another kind: tuned again
    tuning.remember("other", (1, "a"), *args)
    assert tune.calls == 3
    (path,) = (disk / "tuning").iterdir()
    entries = json.loads(path.read_text())
    assert sorted(entries) == ['k [1, "a"]', 'k [2, "a"]', 'other [1, "a"]']
    assert entries['k [1, "a"]']["value"] == {"choice": 3} and entries['k [1, "a"]']["measured"][:2] == "20"
    assert not [p for p in (disk / "tuning").iterdir() if p != path]  # nothing half-written left behind


def test_a_full_file_drops_its_oldest_results(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries left by older kernel sources do not pile up: past MAX_ENTRIES the oldest measured go (a damaged
    entry first), the result just tuned stays even when its time ties with others', and loads keep working."""
    monkeypatch.setattr(tuning, "MAX_ENTRIES", 3)
    tune = Counting({"choice": 1})
    for i in range(3):
        tuning.remember("k", (i,), CPU, tune, dict, dict)
    (path,) = (disk / "tuning").iterdir()
    entries = json.loads(path.read_text())
    entries["k [0]"]["measured"] = "2026-01-01T00:00:00"  # the oldest
    entries["k [1]"] = "damaged"
    path.write_text(json.dumps(entries))
    tuning.remember("k", (3,), CPU, tune, dict, dict)
    assert sorted(json.loads(path.read_text())) == ["k [0]", "k [2]", "k [3]"]  # the damaged one went first
    tuning.remember("k", (4,), CPU, tune, dict, dict)
    assert sorted(json.loads(path.read_text())) == ["k [2]", "k [3]", "k [4]"] and tune.calls == 5
    tuning.remember("k", (4,), CPU, tune, dict, dict)  # loaded: nothing tuned, nothing dropped
    assert tune.calls == 5 and tuning.LOADED == ["k [4]"]


def test_what_cannot_be_read_is_tuned_again(disk: Path) -> None:
    tune = Counting({"choice": 1})

    def strict(d: object) -> dict:
        if not isinstance(d, dict) or "choice" not in d:
            raise ValueError("not a record")
        return d

    tuning.remember("k", (1,), CPU, tune, dict, strict)
    (path,) = (disk / "tuning").iterdir()
    path.write_text(json.dumps({"k [1]": {"value": {"other": 0}, "measured": "x"}}))  # an entry load refuses
    assert tuning.remember("k", (1,), CPU, tune, dict, strict) == {"choice": 1} and tune.calls == 2
    path.write_text("{ truncated")  # a damaged file
    assert tuning.remember("k", (1,), CPU, tune, dict, strict) == {"choice": 1} and tune.calls == 3
    assert json.loads(path.read_text())["k [1]"]["value"] == {"choice": 1}  # rewritten whole


def test_nothing_is_kept_off_cuda_or_with_the_cache_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "DIR", None)
    assert tuning.fingerprint(CPU) is None
    tune = Counting(1)
    for _ in range(2):
        tuning.remember("k", (1,), CPU, tune, int, int)
    assert tune.calls == 2 and not (tmp_path / "tuning").exists()
    monkeypatch.setattr(tuning, "fingerprint", lambda device: "Test GPU")
    monkeypatch.setenv("QVLQ_CACHE_DIR", "off")
    for _ in range(2):
        tuning.remember("k", (1,), CPU, tune, int, int)
    assert tune.calls == 4


def test_an_unwritable_cache_costs_only_the_tuning(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (disk / "file").write_text("")
    monkeypatch.setenv("QVLQ_CACHE_DIR", str(disk / "file"))  # no directory can be made under a file (even as root)
    tune = Counting(7)
    assert tuning.remember("k", (1,), CPU, tune, int, int) == 7
    assert tuning.remember("k", (1,), CPU, tune, int, int) == 7 and tune.calls == 2


def test_tune_results_round_trip_through_json() -> None:
    cfg = int4_mma.variant(int4_mma.CONFIGS[0], 128, glu=1)
    r = int4_mma.TuneResult(cfg, {cfg.name: 1e-5}, {"w8t1": "mismatch"})
    back = tuning.load_tune(int4_mma.TuneResult, int4_mma.Config)(json.loads(json.dumps(tuning.dump_tune(r))))
    assert back == r and isinstance(back.best, int4_mma.Config) and back.best.name == cfg.name
    a = decode_attention.TuneResult(decode_attention.CONFIGS[0], {"x": 2e-6}, {}, 1039, 3e-6)
    load = tuning.load_tune(decode_attention.TuneResult, decode_attention.Config)
    assert load(json.loads(json.dumps(tuning.dump_tune(a)))) == a


def test_int4_mma_tuned_keys_its_candidates_and_source(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tuned() asks remember once per shape; the key names the candidate configs (QVLQ_PDL=0 changes them)
    and the digest of int4_mma.py, and a cleared TUNED (a new process) loads instead of tuning."""
    torch.manual_seed(0)
    p = int4_mma.pack(torch.randint(0, 16, (64, 256), dtype=torch.uint8), torch.full((2, 64), 8, dtype=torch.int32),
                      (torch.rand(2, 64) + 0.5).half().float(), 128, torch.bfloat16)  # fmt: skip
    result = int4_mma.TuneResult(int4_mma.CONFIGS[1], {int4_mma.CONFIGS[1].name: 4e-6}, {})
    tune = Counting(result)
    monkeypatch.setattr(int4_mma, "tune", lambda packed: tune())
    monkeypatch.setattr(int4_mma, "TUNED", {})
    assert int4_mma.tuned(p) == result and tune.calls == 1
    int4_mma.TUNED.clear()
    assert int4_mma.tuned(p) == result and tune.calls == 1
    (name,) = tuning.LOADED
    assert name.startswith("int4_mma [64, 256, 128") and int4_mma.CONFIGS[1].name in name
    assert tuning.digest(int4_mma.__file__) in name
    int4_mma.TUNED.clear()
    monkeypatch.setattr(int4_mma, "configs_for", lambda dev: int4_mma.CONFIGS[:3])  # other candidates
    int4_mma.tuned(p)
    assert tune.calls == 2


def test_the_fastest_choice_is_kept_per_shape(disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QuantLinear's "fastest" record (every kernel's timing, the choice) is measured once per shape; a record
    that names no CUDA kernel is not trusted."""
    record = {"out_features": 64, "in_features": 256, "group_size": 128, "dtype": "bfloat16", "int4_cuda_us": 9.0,
              "mma_us": 5.0, "choice": "mma"}  # fmt: skip
    tune = Counting(record)
    monkeypatch.setattr(QuantLinear, "_time_kernels", lambda self, *a: tune())
    monkeypatch.setattr(int4, "FASTEST", {})
    ql = QuantLinear(256, 64, bits=4, group_size=128)
    args = (torch.zeros(64, 256, dtype=torch.uint8), torch.zeros(2, 64), torch.ones(2, 64), 128, torch.bfloat16)
    assert ql._fastest(*args) == "mma" and tune.calls == 1
    int4.FASTEST.clear()
    assert ql._fastest(*args) == "mma" and tune.calls == 1 and int4.FASTEST[64, 256, 128, "bfloat16"] == record
    with pytest.raises(ValueError, match="not a fastest record"):
        int4._fastest_record({**record, "choice": "dequant"})
