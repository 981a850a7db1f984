"""Weights kept in pinned host memory instead of device memory, two ways.

Streamed blocks: a stack of same-shaped blocks kept in (pinned) host memory and run on the device two
at a time, the next block's weights copied on a side stream while the current one computes.

Why: Qwen-VL's 48 ViT blocks hold 1.84 B parameters, 3.7 GB of the official Int4 checkpoint's 9.7 GB
(the layout keeps them 16-bit), yet they run once per image. Streamed, the Int4 model's device weights
drop to ~6 GB; each image then costs one host-to-device copy of the ViT (3.7 GB: ~75 ms at PCIe 5's
~50 GB/s, ~150 ms at PCIe 4's; inferred, not measured), paid in the time to first token. Decode does not
touch the vision tower, so decode speed is unchanged. Inference only: the blocks' weights are frozen.

A host-mapped embedding: the token-embedding table stays in pinned host memory and the device reads it in
place, across the bus (`device_view`). Why: a step reads one row of it (8 KB for Qwen-VL's 4096-wide bf16
rows; a 2047-token prefill reads 16 MB), yet the table is 151936 rows, 1.24 GB, 13% of the official Int4
checkpoint. Mapped, it leaves device memory for a few microseconds of bus latency per step (inferred, not
measured), and nothing is copied per image or per step.

Both hold their weights in page-locked host memory of the weights' own size (`pinned`).
"""

from __future__ import annotations

import copy
import ctypes
import gc
import math
import mmap
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import cuda_driver

# cuMemHostRegister flags (cuda.h): usable from every context, mapped into the device's address space
_REGISTER_PORTABLE, _REGISTER_DEVICEMAP = 0x01, 0x02
REGISTERED: dict[int, int] = {}  # address -> bytes page-locked by pinned_empty, until unregistered


class _Locked(mmap.mmap):
    """An anonymous private mapping that unregisters itself from the driver when it goes, before its pages are
    unmapped (a subclass's __del__ runs before mmap's own dealloc; a weakref finalizer would run after it)."""

    ctx: ctypes.c_void_p | None = None

    def __del__(self) -> None:
        if self.ctx is None:
            return
        try:
            ptr = self.ptr
            REGISTERED.pop(ptr, None)
            cu = cuda_driver.libcuda()
            if cu.cuCtxPushCurrent_v2(self.ctx) == 0:  # the last tensor may go on any thread
                cu.cuMemHostUnregister(ctypes.c_void_p(ptr))
                cu.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
        except Exception:  # at interpreter exit the modules may be gone; the process frees it all anyway
            pass


def pinned_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """An uninitialised host tensor in page-locked memory of its own size, mapped for `device` at the address
    the host uses (what device_view needs), or None where the driver does not allow that (or it is empty).

    Why not pin_memory=True: PyTorch's pinned allocator rounds every request up to a power of two, so the
    1.24 GB embedding table would pin 2 GB and the 3.7 GB vision tower 4.3 GB. Here the memory is a private
    anonymous mapping of the tensor's size, registered with the driver (cuMemHostRegister) and unregistered
    when the last tensor over it is gone."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return None
    size = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages: what the driver locks anyway
    region = _Locked(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    host = torch.frombuffer(region, dtype=dtype, count=numel).view(shape)  # holds `region` while it lives
    cu = cuda_driver.libcuda()
    with torch.cuda.device(device):
        ctx = cuda_driver.current_context(torch.cuda.current_device())
        ptr = ctypes.c_void_p(host.data_ptr())
        if cu.cuMemHostRegister_v2(ptr, ctypes.c_size_t(size), _REGISTER_PORTABLE | _REGISTER_DEVICEMAP):
            return None
        dptr = ctypes.c_uint64()
        if cu.cuMemHostGetDevicePointer_v2(ctypes.byref(dptr), ptr, 0) or dptr.value != host.data_ptr():
            cu.cuMemHostUnregister(ptr)  # the device would see it at another address: device_view cannot map it
            return None
    region.ctx, region.ptr = ctx, host.data_ptr()
    REGISTERED[region.ptr] = size
    return host


def pinned(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Page-locked host memory for `device`: pinned_empty's exact size where the driver allows it, else
    PyTorch's pinned allocator (rounded up to a power of two)."""
    host = pinned_empty(shape, dtype, device)
    if host is None:
        with torch.cuda.device(device):  # the pinned memory's device is the current one: the model's
            host = torch.empty(shape, dtype=dtype, pin_memory=True)
    return host


def _tensors(block: nn.Module) -> Iterator[tuple[str, Tensor]]:
    yield from block.named_parameters()
    yield from block.named_buffers()


class StreamedBlocks(nn.Module):
    """Runs x through `blocks` in order, as nn.Sequential would, with one flat host buffer per block and two
    device slots (copies of the first block's structure whose tensors are views of one flat buffer each).
    The state dict keeps the original names (`resblocks.N.<name>`, host tensors), so accounting and any
    comparison with the resident model see the same checkpoint."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, name: str = "resblocks") -> None:
        super().__init__()
        first = blocks[0]
        self.layout = [(n, t.shape, t.numel()) for n, t in _tensors(first)]
        dtypes = {t.dtype for _, t in _tensors(first)}
        if len(dtypes) != 1:
            raise ValueError(f"streamed blocks need one dtype for all their tensors, got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        self.numel = sum(n for _, _, n in self.layout)
        self.name = name
        pin = device.type == "cuda"
        self.device = device
        for block in blocks:
            if [(n, t.shape) for n, t in _tensors(block)] != [(n, s) for n, s, _ in self.layout]:
                raise ValueError("streamed blocks must all have the first block's tensors and shapes")
        self.host = self._host_buffers(len(blocks))
        for flat, block in zip(self.host, blocks, strict=True):
            for view, (_, t) in zip(self._views(flat), _tensors(block), strict=True):
                view.copy_(t.detach())  # one tensor at a time: no second device copy of a block
        # slots: plain attributes, not submodules, so that nothing outside (a .to(), a cast of model.parameters())
        # rebinds their tensors away from the flat buffers the copies write; cast_() changes the dtype
        self.slots = [copy.deepcopy(first).requires_grad_(False).eval() for _ in range(min(2, len(blocks)))]
        self.slot_flat = [self._bind(slot, device) for slot in self.slots]
        self._copy = torch.cuda.Stream(device) if pin else None
        self._ready = [torch.cuda.Event() for _ in self.slots] if pin else []
        self._done = [torch.cuda.Event() for _ in self.slots] if pin else []

    def _host_buffers(self, n: int) -> list[Tensor]:
        """n flat block buffers, views of ONE host allocation (pinned for a CUDA device): one registration, and
        where pinning falls back to PyTorch's allocator, one power-of-two rounding instead of one per block."""
        if self.device.type != "cuda":
            return list(torch.empty(n, self.numel, dtype=self.dtype).unbind(0))
        return list(pinned((n, self.numel), self.dtype, self.device).unbind(0))

    def _bind(self, slot: nn.Module, device: torch.device) -> Tensor:
        """A new flat buffer on device whose views become slot's tensors (one copy then loads a block)."""
        flat = torch.empty(self.numel, dtype=self.dtype, device=device)
        for view, (_, t) in zip(self._views(flat), _tensors(slot), strict=True):
            t.data = view
        return flat

    def cast_(self, dtype: torch.dtype) -> StreamedBlocks:
        """The blocks' weights in dtype (as model.to(dtype) would cast a resident stack)."""
        if dtype != self.dtype:
            old, self.dtype = self.host, dtype
            self.host = self._host_buffers(len(old))
            for new, h in zip(self.host, old, strict=True):
                new.copy_(h)
            self.slot_flat = [self._bind(slot, f.device) for slot, f in zip(self.slots, self.slot_flat, strict=True)]
        return self

    def _views(self, flat: Tensor) -> list[Tensor]:
        out, off = [], 0
        for _, shape, n in self.layout:
            out.append(flat[off : off + n].view(shape))
            off += n
        return out

    @property
    def host_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.host)

    @property
    def slot_bytes(self) -> int:
        return sum(f.numel() * f.element_size() for f in self.slot_flat)

    @property
    def host_params(self) -> int:
        return len(self.host) * sum(p.numel() for p in self.slots[0].parameters())

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        for i, flat in enumerate(self.host):
            for (n, _, _), view in zip(self.layout, self._views(flat), strict=True):
                destination[f"{prefix}{self.name}.{i}.{n}"] = view

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        n, slots = len(self.host), len(self.slots)
        if self._copy is None:  # CPU: nothing to overlap
            for i in range(n):
                self.slot_flat[i % slots].copy_(self.host[i])
                x = self.slots[i % slots](x)
            return x
        compute = torch.cuda.current_stream(x.device)
        self._copy.wait_stream(compute)  # the slots' last use (a previous call) and x are ordered before
        self._load(0)
        for i in range(n):
            s = i % slots
            if i + 1 < n:
                if i + 1 >= slots:  # the slot's previous block (i + 1 - slots) must have finished computing
                    self._copy.wait_event(self._done[(i + 1) % slots])
                self._load(i + 1)
            compute.wait_event(self._ready[s])
            x = self.slots[s](x)
            self._done[s].record(compute)
        return x

    def _load(self, i: int) -> None:
        s = i % len(self.slots)
        with torch.cuda.stream(self._copy):
            self.slot_flat[s].copy_(self.host[i], non_blocking=True)
            self._ready[s].record(self._copy)


def stream_vision(model: nn.Module) -> StreamedBlocks:
    """Keep the ViT's blocks of a loaded Qwen-VL model in host memory and stream them per image (see the
    module docstring); the rest of the model stays where it is. Returns the streamed stack."""
    visual = model.transformer.visual
    vit = visual.transformer
    if isinstance(vit, StreamedBlocks):
        return vit
    device = visual.conv1.weight.device
    streamed = StreamedBlocks(vit.resblocks, device)
    visual.transformer = streamed
    del vit
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the blocks' device memory back, as NVML reports it
    return streamed


@torch.no_grad()
def stream_vision_checked(model: nn.Module, pixels: Tensor) -> str:
    """stream_vision, with the features of `pixels` compared before and after: "identical", how they differ, or
    "already streamed" (then nothing to compare with). A profile records it: a tower that streamed the wrong
    weights would still be timed and measured without complaint."""
    visual = model.transformer.visual
    if isinstance(visual.transformer, StreamedBlocks):
        return "already streamed"
    want = visual(pixels)
    stream_vision(model)
    return _same(visual(pixels), want)


def _same(got: Tensor, want: Tensor) -> str:
    if torch.equal(got, want):
        return "identical"
    return f"DIFFERENT: max abs difference {float((got.float() - want.float()).abs().max()):.3g}"


# the CUDA array interface has no bfloat16: a table is shared as ints of its element size and viewed back
_INT_OF_SIZE = {1: (torch.uint8, "|u1"), 2: (torch.int16, "<i2"), 4: (torch.int32, "<i4"), 8: (torch.int64, "<i8")}


class _HostArray:
    """A pinned host tensor presented through the CUDA array interface; alive as long as the device view."""

    def __init__(self, host: Tensor) -> None:
        self.host = host
        _, typestr = _INT_OF_SIZE[host.element_size()]
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": tuple(host.shape), "typestr": typestr, "data": (host.data_ptr(), False), "strides": None,
            "version": 3,
        }  # fmt: skip


def device_view(host: Tensor, device: torch.device) -> Tensor:
    """A `device` tensor over the pinned, contiguous `host` tensor's memory (no copy): kernels that read it
    read host memory across the bus. Under CUDA's unified addressing (every 64-bit platform) an allocation of
    cudaHostAlloc, which is what torch's pinned allocator makes, has the same address on the device, and
    pinned_empty checks that its registered memory does. The caching allocator never sees the view, so
    memory_allocated() and NVML leave it out, as they should."""
    if device.type != "cuda" or not host.is_pinned() or not host.is_contiguous():
        raise ValueError("device_view needs a contiguous pinned host tensor and a CUDA device")
    as_int, _ = _INT_OF_SIZE[host.element_size()]
    # as_tensor takes the interface's pointer as it is and does not copy onto its own device; the check below
    # holds it to that (asarray's copy=False is not used: its path for such objects is not documented)
    view = torch.as_tensor(_HostArray(host), device=device)
    if view.data_ptr() != host.data_ptr() or view.dtype != as_int:
        raise RuntimeError("torch copied the host tensor instead of mapping it")
    return view.view(host.dtype)


def host_mapped(module: nn.Module) -> Tensor | None:
    """The host tensor behind `module.weight` if host_embedding mapped it and nothing has replaced it since
    (a cast, or a .to() to another device, makes a new device tensor), else None."""
    host = getattr(module, "host_weight", None)
    if host is None or module.weight.data_ptr() != host.data_ptr():
        return None
    return host


def host_embedding(model: nn.Module) -> int:
    """Keep a loaded Qwen-VL model's token-embedding table in pinned host memory, read by the device in place
    (see the module docstring). Returns the bytes it holds in host memory: 0 off CUDA, where the table is in
    host memory already. Idempotent; map again after a cast."""
    wte = model.transformer.wte
    w = wte.weight
    if w.device.type != "cuda":
        return 0
    host = host_mapped(wte)
    if host is None:
        wte.host_weight = None  # a stale table (a cast replaced the weight) goes before the new one is pinned
        host = pinned(w.shape, w.dtype, w.device)
        host.copy_(w.detach())
        wte.weight = nn.Parameter(device_view(host, w.device), requires_grad=False)
        wte.host_weight = host  # a plain attribute: not in the state dict, which holds the view
        del w
        # the old table goes once nothing refers to it; a GPU test process (2026-11-27, H100) kept it past this
        # point, while a fresh process gave it back after a collection: collect before handing memory back
        gc.collect()
        torch.cuda.empty_cache()  # give the table's device memory back, as NVML reports it
    return host.numel() * host.element_size()


@torch.no_grad()
def host_embedding_checked(model: nn.Module, ids: Tensor) -> str:
    """host_embedding, with the embeddings of `ids` compared before and after: "identical", how they differ,
    "already mapped", or "not mapped (CPU)"."""
    wte = model.transformer.wte
    if host_mapped(wte) is not None:
        return "already mapped"
    if wte.weight.device.type != "cuda":
        return "not mapped (CPU: the table is in host memory already)"
    want = wte(ids)
    host_embedding(model)
    return _same(wte(ids), want)


def host_pinning(model: nn.Module) -> str:
    """How the weights a model keeps in host memory are page-locked, for reports ("" if it keeps none there)."""
    vit, table = model.transformer.visual.transformer, host_mapped(model.transformer.wte)
    kept = [("vision tower", vit.host[0])] if isinstance(vit, StreamedBlocks) and vit.device.type == "cuda" else []
    kept += [("embedding", table)] if table is not None else []
    how = {True: "exact size (registered with the driver)", False: "PyTorch's pinned allocator (a power of two)"}
    return ", ".join(f"{name}: {how[h.untyped_storage().data_ptr() in REGISTERED]}" for name, h in kept)


def keep_in_host(model: nn.Module, stream: bool, embedding: bool) -> None:
    """The loaders' --stream-vision and --host-embedding: see stream_vision and host_embedding."""
    if stream:
        stream_vision(model)
    if embedding:
        host_embedding(model)
