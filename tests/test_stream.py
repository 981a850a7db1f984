"""qvlq.model.stream: a stack of blocks in host memory run through two device slots (the vision tower's
--stream-vision), and the token-embedding table in host memory read in place (--host-embedding). On CPU the
slots are loaded synchronously and the table is where it is; the CUDA tests check the copy stream's order, the
mapped table's values inside a CUDA graph, and the device memory each saves; pinned_empty's registrations run
against a fake driver on the CPU and the real one in the CUDA tests."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import mmap
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from qvlq.cli import app
from qvlq.image import pixels_for
from qvlq.model import stream
from qvlq.model.modeling import QWenLMHeadModel
from qvlq.model.stream import (
    REGISTERED,
    StreamedBlocks,
    _HostArray,
    device_view,
    host_embedding,
    host_embedding_checked,
    host_mapped,
    host_pinning,
    pinned_empty,
    stream_vision,
    stream_vision_checked,
)
from qvlq.profile import ProfileSettings, run_profile, weight_accounting
from qvlq.profile_report import load_report, report_json
from qvlq.random_model import build_random_model, quantize_model_rtn

HAS_CUDA = torch.cuda.is_available()


def _blocks(n: int = 5, width: int = 8, device: str = "cpu") -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList(
        nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        for _ in range(n)
    ).to(device)


def _sequential(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for b in blocks:
            x = x + b(x)  # residual, so a skipped or repeated block changes the result
    return x


class Residual(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def _residual_blocks(n: int = 5, width: int = 8, device: str = "cpu") -> tuple[nn.ModuleList, nn.ModuleList]:
    inner = _blocks(n, width, device)
    return inner, nn.ModuleList(Residual(b) for b in inner)


def test_streamed_blocks_run_every_block_once_in_order():
    inner, blocks = _residual_blocks()
    original = copy.deepcopy(inner)
    x = torch.randn(3, 8)
    want = _sequential(inner, x)
    ref_sd = {f"resblocks.{k}": v.clone() for k, v in blocks.state_dict().items()}
    st = StreamedBlocks(blocks, torch.device("cpu"))
    assert torch.equal(st(x), want) and torch.equal(st(x), want)  # a second call reloads the slots
    assert len(st.slots) == 2 and not list(st.parameters())  # nothing for .to() or an optimizer to rebind
    n_params = sum(p.numel() for p in blocks.parameters())
    assert st.host_params == n_params and st.host_bytes == 4 * n_params and st.slot_bytes == 2 * st.host_bytes // 5
    assert len({h.untyped_storage().data_ptr() for h in st.host}) == 1  # one (pinned) allocation for all blocks
    sd = st.state_dict()  # the original names and values: accounting sees the checkpoint
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad():  # the host copy is the weight: the original blocks no longer matter
        blocks[2].inner[1].weight.add_(1)
    assert torch.equal(st(x), want)

    bf16 = original.to(torch.bfloat16)
    assert torch.equal(st.cast_(torch.bfloat16)(x.bfloat16()), _sequential(bf16, x.bfloat16()))
    assert st.host_bytes == 2 * n_params and st.state_dict()["resblocks.0.inner.1.weight"].dtype == torch.bfloat16
    assert len({h.untyped_storage().data_ptr() for h in st.host}) == 1


def test_streamed_blocks_refuse_stacks_they_cannot_flatten():
    blocks = _blocks(3)
    blocks[1][1].weight.data = blocks[1][1].weight.data.half()
    with pytest.raises(ValueError, match="one dtype"):
        StreamedBlocks(nn.ModuleList([blocks[1], blocks[0]]), torch.device("cpu"))
    with pytest.raises(ValueError, match="first block's tensors and shapes"):
        StreamedBlocks(nn.ModuleList([_blocks(1, 8)[0], _blocks(1, 16)[0]]), torch.device("cpu"))


def test_streamed_vision_tower_keeps_features_checkpoint_and_accounting(tiny_dir, tiny_model, image_file, image_feats):
    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype="fp32")
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert stream_vision_checked(model, pixels_for([image_file], 448)) == "identical"
    st = model.transformer.visual.transformer
    assert stream_vision(model) is st and isinstance(st, StreamedBlocks)
    with torch.no_grad():
        assert torch.equal(model.transformer.visual(pixels_for([image_file], 448)), image_feats)
    sd = model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    acc, ref = weight_accounting(model), weight_accounting(tiny_model)
    assert (acc.checkpoint_bytes, acc.float_params) == (ref.checkpoint_bytes, ref.float_params)
    vit = sum(v.numel() * v.element_size() for k, v in sd.items() if ".visual.transformer." in k)
    assert acc.host_bytes == st.host_bytes == vit > 0
    assert acc.resident_bytes == ref.resident_bytes - vit + st.slot_bytes


def test_random_int4_variant_casts_a_streamed_tower():
    """The profile streams the BF16 random model, then packs its Int4 variant in place with fp16 weights."""
    model = build_random_model("tiny", torch.device("cpu"), seed=0)
    st = stream_vision(model)
    quantize_model_rtn(model, dtype=torch.float16, backend="dequant")
    assert st.dtype == torch.float16 == model.transformer.visual.conv1.weight.dtype
    with torch.no_grad():
        feats = model.transformer.visual(torch.zeros(1, 3, 448, 448))
    assert feats.dtype == torch.float16 and bool(torch.isfinite(feats).all())


def test_profile_with_a_streamed_vision_tower(tmp_path):
    s = ProfileSettings(random_weights="tiny", device="cpu", runs=[1], warmup_tokens=4, crosscheck_tokens=8,
                        contexts=[292], engines=["hf", "fast"], precisions=["bf16", "int4"],
                        stream_vision=True)  # fmt: skip
    report = run_profile(s)
    assert [c.status for c in report.speed] == ["ok"] * 4
    assert all(x.agree == x.compared == 8 for x in report.crosschecks)  # both engines, streamed tower
    assert all(m.host_bytes > 0 and m.resident_bytes > 0 for m in report.models)
    assert [m.stream_check for m in report.models] == ["identical", "already streamed"]
    assert any("VISION TOWER STREAMED" in n for n in report.notes)
    assert any("bf16: identical; int4: already streamed" in n for n in report.notes)


def test_stream_check_reports_a_tower_that_computes_something_else(tiny_dir, monkeypatch):
    import qvlq.model.stream as stream

    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype="fp32")
    real = stream.stream_vision

    def wrong(m):  # a planted bug: one block's weights lost on the way to the host
        st = real(m)
        st.host[1].zero_()
        return st

    monkeypatch.setattr(stream, "stream_vision", wrong)
    assert stream.stream_vision_checked(model, torch.randn(1, 3, 448, 448)).startswith("DIFFERENT: max abs")


def test_cli_chat_stream_vision_answers_as_the_resident_model(tiny_dir, image_file):
    args = ["chat", str(tiny_dir), "--image", str(image_file), "what is this?", "--greedy", "--max-new-tokens", "4",
            "--dtype", "fp32", "--json"]  # fmt: skip
    plain, streamed = (CliRunner().invoke(app, a) for a in (args, [*args, "--stream-vision"]))
    assert plain.exit_code == streamed.exit_code == 0, plain.output + streamed.output
    assert json.loads(streamed.stdout) == json.loads(plain.stdout)


def test_host_embedding_leaves_a_cpu_model_alone(tiny_dir):
    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype="fp32")
    wte = model.transformer.wte
    w = wte.weight
    assert host_embedding(model) == 0 and wte.weight is w and host_mapped(wte) is None
    assert host_embedding_checked(model, torch.tensor([[1, 2]])).startswith("not mapped (CPU")
    with pytest.raises(ValueError, match="contiguous pinned host tensor and a CUDA device"):
        device_view(w.detach(), torch.device("cpu"))
    table = w.detach().bfloat16()  # the array interface has no bfloat16: the table goes as int16 of its address
    cai = _HostArray(table).__cuda_array_interface__
    assert cai["typestr"] == "<i2" and cai["shape"] == tuple(table.shape) and cai["data"][0] == table.data_ptr()


def _mapped(address: int) -> bool:
    """Whether `address` lies in one of this process's mappings (read from /proc, so an unmapped one is safe)."""
    with open("/proc/self/maps") as f:
        spans = (line.split()[0].split("-") for line in f)
        return any(int(lo, 16) <= address < int(hi, 16) for lo, hi in spans)


class _FakeDriver:
    """The four libcuda calls pinned_empty makes, on the CPU: registrations are recorded, and the device sees
    registered memory at `offset` from the host's address (0: the same address, as under unified addressing)."""

    def __init__(self, register_rc: int = 0, offset: int = 0) -> None:
        self.register_rc, self.offset = register_rc, offset
        self.registered: dict[int, tuple[int, int]] = {}  # address -> (bytes, flags)
        self.unregistered: list[int] = []
        self.contexts: list[str] = []

    def cuMemHostRegister_v2(self, ptr: ctypes.c_void_p, size: ctypes.c_size_t, flags: int) -> int:
        if self.register_rc == 0:
            self.registered[ptr.value] = (size.value, flags)
        return self.register_rc

    def cuMemHostGetDevicePointer_v2(self, out: Any, ptr: ctypes.c_void_p, flags: int) -> int:
        ctypes.cast(out, ctypes.POINTER(ctypes.c_uint64))[0] = ptr.value + self.offset
        return 0 if ptr.value in self.registered else 1

    def cuMemHostUnregister(self, ptr: ctypes.c_void_p) -> int:
        assert _mapped(ptr.value), "unregistered after its pages were unmapped"
        self.unregistered.append(ptr.value)
        return 0 if self.registered.pop(ptr.value, None) else 1

    def cuCtxPushCurrent_v2(self, ctx: ctypes.c_void_p) -> int:
        self.contexts.append(f"push {ctx.value}")
        return 0

    def cuCtxPopCurrent_v2(self, out: Any) -> int:
        self.contexts.append("pop")
        return 0


@pytest.fixture
def fake_driver(monkeypatch):
    """pinned_empty on this CPU-only machine: libcuda faked, torch.cuda.device a no-op on device 0, a fixed context."""
    driver = _FakeDriver()
    monkeypatch.setattr(stream.cuda_driver, "libcuda", lambda: driver)
    monkeypatch.setattr(stream.cuda_driver, "current_context", lambda index: ctypes.c_void_p(4242))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return driver


def test_pinned_empty_locks_whole_pages_of_its_size_until_the_last_view_is_gone(fake_driver):
    """Exact size (pages, not PyTorch's power of two), portable + device-mapped, and unregistered, in the context
    it was registered in, only when no tensor over the memory is left: views outlive the tensor they came from."""
    host = pinned_empty((3, 5000), torch.bfloat16, torch.device("cuda", 0))
    ptr = host.data_ptr()
    size = -(-3 * 5000 * 2 // mmap.PAGESIZE) * mmap.PAGESIZE
    assert fake_driver.registered == {ptr: (size, 0x3)} and REGISTERED[ptr] == size and size < 2 * 30000
    assert host.shape == (3, 5000) and host.dtype == torch.bfloat16 and host.is_contiguous()
    host.copy_(torch.arange(15000).view(3, 5000))  # writable memory of the right size
    rows = host.unbind(0)
    del host
    gc.collect()
    assert fake_driver.unregistered == [] and torch.equal(rows[2], torch.arange(10000, 15000).bfloat16())
    del rows
    gc.collect()
    assert fake_driver.unregistered == [ptr] and fake_driver.contexts == ["push 4242", "pop"] and ptr not in REGISTERED


def test_pinned_empty_declines_memory_the_device_cannot_map_at_the_host_address(fake_driver):
    """A failed registration, or a device address other than the host's (device_view would read the wrong
    memory): None, so `pinned` takes PyTorch's allocator, and nothing is left registered."""
    fake_driver.register_rc = 2  # CUDA_ERROR_OUT_OF_MEMORY
    assert pinned_empty((4, 4), torch.float32, torch.device("cuda", 0)) is None
    assert fake_driver.registered == {} and fake_driver.unregistered == []
    fake_driver.register_rc, fake_driver.offset = 0, 4096
    assert pinned_empty((4, 4), torch.float32, torch.device("cuda", 0)) is None
    assert fake_driver.registered == {} and len(fake_driver.unregistered) == 1 and not REGISTERED
    assert pinned_empty((0, 4), torch.float32, torch.device("cuda", 0)) is None  # nothing to lock


def test_streamed_blocks_and_a_mapped_table_on_registered_memory(fake_driver, monkeypatch):
    """StreamedBlocks for a CUDA device takes one registration for all its blocks (their buffers are views of
    it) and a cast another, the first unregistered; host_pinning names how each host-kept part is locked. The
    device side is faked: slots and the copy stream stay on the CPU."""
    monkeypatch.setattr(StreamedBlocks, "_bind", lambda self, slot, device: torch.empty(self.numel, dtype=self.dtype))
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "Event", lambda: None)
    blocks = _blocks(4, 8)
    st = StreamedBlocks(blocks, torch.device("cuda", 0))
    base = st.host[0].data_ptr()
    assert list(fake_driver.registered) == [base] and all(h.untyped_storage().data_ptr() == base for h in st.host)
    assert fake_driver.registered[base][0] >= st.host_bytes and torch.equal(st.host[3], torch.cat(
        [t.detach().flatten() for _, t in stream._tensors(blocks[3])]))  # fmt: skip
    st._copy = object()  # as on CUDA: cast_ pins the new buffers
    st.cast_(torch.float16)
    gc.collect()
    assert fake_driver.unregistered == [base] and list(fake_driver.registered) == [st.host[0].data_ptr()]
    model = type("M", (), {})()
    model.transformer = type("T", (), {})()
    model.transformer.visual = type("V", (), {"transformer": st})()
    model.transformer.wte = nn.Embedding(4, 2)
    assert host_pinning(model) == "vision tower: exact size (registered with the driver)"
    model.transformer.wte.host_weight = model.transformer.wte.weight.detach()  # as host_embedding leaves it
    assert host_pinning(model).endswith("embedding: PyTorch's pinned allocator (a power of two)")
    del st, model
    gc.collect()
    assert not fake_driver.registered and not REGISTERED  # the cast's buffers, once the stack is gone


def test_accounting_moves_a_mapped_table_from_resident_to_host(tiny_dir):
    """What host_embedding leaves behind, made by hand on CPU (the mapping itself needs CUDA: the GPU test):
    the table is counted once, in host bytes; a cast that replaces the weight ends the mapping."""
    model = QWenLMHeadModel.from_pretrained(tiny_dir, dtype="fp32")
    ref = weight_accounting(model)
    wte = model.transformer.wte
    wte.host_weight = wte.weight.data  # the view and its host tensor share one address, as on CUDA
    table = wte.weight.numel() * 4
    acc = weight_accounting(model)
    assert host_mapped(wte) is wte.host_weight and acc.host_bytes == table > 0
    assert acc.resident_bytes == ref.resident_bytes - table
    assert (acc.checkpoint_bytes, acc.float_params, acc.read_bytes_per_token) == (
        ref.checkpoint_bytes, ref.float_params, ref.read_bytes_per_token)  # fmt: skip
    wte.weight.data = wte.weight.data.half()  # a cast (the random Int4 variant's fp16) makes a new table
    assert host_mapped(wte) is None and weight_accounting(model).host_bytes == 0


def test_profile_with_host_embedding_on_cpu_says_it_mapped_nothing(tmp_path):
    s = ProfileSettings(random_weights="tiny", device="cpu", runs=[1], warmup_tokens=4, crosscheck_tokens=8,
                        contexts=[292], engines=["fast"], precisions=["bf16"], host_embedding=True)  # fmt: skip
    report = run_profile(s)
    assert [c.status for c in report.speed] == ["ok"] and report.models[0].host_bytes == 0
    assert report.models[0].embedding_check.startswith("not mapped (CPU")
    assert any("EMBEDDING IN HOST MEMORY" in n for n in report.notes)
    d = json.loads(json.dumps(report_json(report)))  # a report.json of stop 17 named host_bytes streamed_bytes
    for m in d["models"]:
        m["streamed_bytes"] = m.pop("host_bytes") + 5
        del m["embedding_check"]
    (tmp_path / "report.json").write_text(json.dumps(d))
    assert load_report(tmp_path / "report.json").models[0].host_bytes == 5


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_stream_overlaps_copies_in_order_and_frees_the_blocks():
    """12 blocks of 8 MiB through two slots, the copy stream racing the compute stream: the result equals the
    resident stack's bit for bit on every call and after a cast, and the device keeps two blocks, not twelve."""
    dev = torch.device("cuda")
    inner, blocks = _residual_blocks(12, 512, "cuda")
    x = torch.randn(64, 512, device=dev)
    want = _sequential(inner, x)
    on_host = copy.deepcopy(inner).cpu()
    before = torch.cuda.memory_allocated(dev)
    st = StreamedBlocks(blocks, dev)
    del inner, blocks
    freed = before - torch.cuda.memory_allocated(dev)
    assert freed >= st.host_bytes - st.slot_bytes - 2**20 and st.host[0].is_pinned()
    assert REGISTERED.get(st.host[0].data_ptr(), 0) >= st.host_bytes  # exact size, not PyTorch's power of two
    for _ in range(3):
        assert torch.equal(st(x), want)
    side = torch.cuda.Stream(dev)  # a caller on another stream: its x and the slots' last use order the copies
    with torch.cuda.stream(side):
        y = st(x)
    side.synchronize()
    assert torch.equal(y, want)
    bf16 = on_host.to(dev, torch.bfloat16)  # cast_ (the random Int4 variant's fp16/bf16 weights)
    assert torch.equal(st.cast_(torch.bfloat16)(x.bfloat16()), _sequential(bf16, x.bfloat16()))
    assert st.host[0].is_pinned() and st.slot_flat[0].dtype == torch.bfloat16


class _Schedule:
    """The CUDA branch of StreamedBlocks.forward on fake streams and events: every copy into a slot and every
    block computed on one is a node, with happens-before edges from stream order, event waits and stream waits
    (what CUDA guarantees, nothing more). The real copies and computes run at once, on the CPU."""

    def __init__(self, ignore_copy_waits: bool = False) -> None:
        self.nodes: list[tuple[str, int, int]] = []  # (kind, slot, block)
        self.after: list[set[int]] = []  # node -> the nodes it must follow directly
        self.ignore_copy_waits = ignore_copy_waits
        self.compute, self.copy = _FakeStream(self, "compute"), _FakeStream(self, "copy")
        self.current = self.compute

    def issue(self, stream: _FakeStream, kind: str, slot: int, block: int) -> None:
        deps = {d for d in [stream.last, *stream.pending] if d is not None}
        self.nodes.append((kind, slot, block))
        self.after.append(deps)
        stream.last, stream.pending = len(self.nodes) - 1, []

    def before(self, a: int, b: int) -> bool:  # a happens before b
        todo, seen = [b], set()
        while todo:
            for d in self.after[todo.pop()]:
                if d == a:
                    return True
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return False

    def races(self) -> list[str]:
        """Each compute must follow the copy of its own block into its slot, and be ordered against every other
        copy into that slot (that copy before its own copy, or after the compute)."""
        found = []
        for c, (kind, slot, block) in enumerate(self.nodes):
            if kind != "compute":
                continue
            own = [k for k, n in enumerate(self.nodes[:c]) if n == ("copy", slot, block)]
            if not own or not self.before(own[-1], c):
                found.append(f"block {block} computed on slot {slot} without its copy before it")
                continue
            for k, (kk, ss, bb) in enumerate(self.nodes):
                if kk == "copy" and ss == slot and k != own[-1]:
                    if not (self.before(k, own[-1]) or self.before(c, k)):
                        found.append(f"copy of block {bb} into slot {slot} races block {block}'s compute")
        return found


class _FakeStream:
    def __init__(self, sim: _Schedule, name: str) -> None:
        self.sim, self.name, self.last, self.pending = sim, name, None, []

    def wait_event(self, event: _FakeEvent) -> None:
        if not (self.sim.ignore_copy_waits and self.name == "copy"):
            self.pending.append(event.last)

    def wait_stream(self, other: _FakeStream) -> None:
        if not (self.sim.ignore_copy_waits and self.name == "copy"):
            self.pending.append(other.last)


class _FakeEvent:
    last = None

    def record(self, stream: _FakeStream) -> None:
        self.last = stream.last  # everything issued on stream so far


def _scheduled(st: StreamedBlocks, sim: _Schedule, monkeypatch) -> None:
    """Run st's CUDA branch on sim: fake streams and events, copies and computes recorded as they are issued."""
    import contextlib

    @contextlib.contextmanager
    def on(stream):
        prev, sim.current = sim.current, stream
        try:
            yield
        finally:
            sim.current = prev

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sim.compute)
    monkeypatch.setattr(torch.cuda, "stream", on)
    st._copy, st._ready, st._done = sim.copy, [_FakeEvent() for _ in st.slots], [_FakeEvent() for _ in st.slots]

    class Flat:  # a slot's buffer: the copy runs now and is recorded on the current stream
        def __init__(self, s: int, flat: torch.Tensor) -> None:
            self.s, self.flat = s, flat

        def copy_(self, src: torch.Tensor, non_blocking: bool = False) -> None:
            self.flat.copy_(src)
            sim.issue(sim.current, "copy", self.s, next(i for i, h in enumerate(st.host) if h is src))

    class Slot(nn.Module):  # a slot's block: computed now, recorded on the compute stream
        def __init__(self, s: int, block: nn.Module) -> None:
            super().__init__()
            self.s, self.block = s, block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            computed = sum(1 for n in sim.nodes if n[0] == "compute")
            sim.issue(sim.current, "compute", self.s, computed % len(st.host))
            return self.block(x)

    st.slot_flat = [Flat(s, f) for s, f in enumerate(st.slot_flat)]
    st.slots = [Slot(s, b) for s, b in enumerate(st.slots)]


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_copy_stream_schedule_is_race_free(n, monkeypatch):
    """What a GPU run would race on, checked without one: every block computes on its own weights, and no copy
    overwrites a slot that a block still reads, over two calls (the second reuses slots the first left)."""
    inner, blocks = _residual_blocks(n)
    x = torch.randn(3, 8)
    want = _sequential(inner, x)
    st = StreamedBlocks(blocks, torch.device("cpu"))
    sim = _Schedule()
    _scheduled(st, sim, monkeypatch)
    assert torch.equal(st(x), want) and torch.equal(st(x), want)
    assert [n_ for n_ in sim.nodes if n_[0] == "compute"] == [("compute", i % 2, i) for i in range(n)] * 2
    assert sim.races() == []

    # the checker itself: with the copy stream's waits dropped, the copies race the computes
    if n > 2:
        st2 = StreamedBlocks(_residual_blocks(n)[1], torch.device("cpu"))
        bad = _Schedule(ignore_copy_waits=True)
        _scheduled(st2, bad, monkeypatch)
        st2(x)
        assert any("races" in r for r in bad.races())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_host_embedding_reads_the_pinned_table_in_place(tiny_dir, image_file):
    """The table leaves the allocator, the device reads the pinned host copy at its own address (eagerly and
    from a replayed CUDA graph with new ids), values and state dict unchanged, and chat answers as before."""
    dev = torch.device("cuda")
    model = QWenLMHeadModel.from_pretrained(tiny_dir, device=dev, dtype="fp32")
    wte = model.transformer.wte
    ids = torch.randint(0, wte.num_embeddings, (2, 7), device=dev)
    want, table = wte(ids), wte.weight.detach().cpu()
    before = torch.cuda.memory_allocated(dev)
    assert host_embedding_checked(model, ids) == "identical"
    assert before - torch.cuda.memory_allocated(dev) >= table.numel() * 4
    host = host_mapped(wte)
    assert host is not None and host.is_pinned() and wte.weight.is_cuda and wte.weight.data_ptr() == host.data_ptr()
    assert host.data_ptr() in REGISTERED and host_pinning(model) == "embedding: exact size (registered with the driver)"
    assert host_embedding(model) == table.numel() * 4 and host_mapped(wte) is host  # idempotent
    assert torch.equal(model.state_dict()["transformer.wte.weight"].cpu(), table)
    graph, static = torch.cuda.CUDAGraph(), ids.clone()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side), torch.no_grad():
        wte(static)  # warm-up off the capture, as torch asks
    torch.cuda.current_stream(dev).wait_stream(side)
    with torch.cuda.graph(graph), torch.no_grad():
        out = wte(static)
    for _ in range(2):
        new = torch.randint(0, wte.num_embeddings, ids.shape, device=dev)
        static.copy_(new)
        graph.replay()
        assert torch.equal(out.cpu(), table[new.cpu()])
    assert torch.equal(wte(ids), want)
    wte.weight.data = wte.weight.data.half()  # the random Int4 variant's cast: a device table again, mapped again
    assert host_mapped(wte) is None and host_embedding(model) == table.numel() * 2
    assert host_mapped(wte).dtype == torch.float16 and torch.equal(wte(ids), want.half())
    old = host.data_ptr()
    del host, graph, out
    gc.collect()
    assert old not in REGISTERED and host_mapped(wte).data_ptr() in REGISTERED  # the fp32 table unregistered
    args = ["chat", str(tiny_dir), "--image", str(image_file), "what is this?", "--greedy", "--max-new-tokens", "6",
            "--dtype", "fp32", "--device", "cuda", "--json"]  # fmt: skip
    plain, mapped = (CliRunner().invoke(app, a) for a in (args, [*args, "--host-embedding"]))
    assert plain.exit_code == mapped.exit_code == 0, plain.output + mapped.output
    assert json.loads(mapped.stdout) == json.loads(plain.stdout)
