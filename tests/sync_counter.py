"""Counts the device->host synchronisations a piece of training code would make on a GPU, on CPU.

On CPU nothing synchronises, so the counter tracks which tensors *would* live on the compute device:
the job runs with the compute device `cpu:0` (a `torch.device` that differs from the host's `cpu`,
though both are the same memory), and a `TorchDispatchMode` follows every tensor from there:

- device tensors: whatever existed when counting started (weights, gradients, optimizer moments)
  but for the tensors that stay on the host on a GPU too (`host`: AdamW's step counters), what a
  factory or copy puts on `cpu:0`, what a collective touches (NCCL takes device tensors only), and
  every result of an op with a device input;
- host tensors: everything else, and what is copied to the plain `cpu` device.

A synchronisation is then: `_local_scalar_dense` (`.item()`, `float()`, `int()`, `bool()`) of a
device tensor; `nonzero`, boolean-mask indexing, `bincount`, `unique`, `masked_select`,
`repeat_interleave` without `output_size`, `equal`; and a copy of a device tensor to the host
(`.cpu()`, `.to("cpu")`, `.tolist()`, `.numpy()`, `host.copy_(device)`), which on CPU dispatches
nothing and is caught by wrapping those methods while counting.

While counting, a device tensor's `.device` reads `cpu:0`, so `.to(t.device)`, `device=t.device`
and device comparisons behave as they would on a GPU, and a move to `cpu:0` is one to the device
(without copying, as `.to(device)` of a tensor already there on a GPU).

DeepSpeed names the device through its accelerator, whose CPU flavour says `cpu`: its moves and
buffers "on the device" would read as host copies. While counting, its accelerator names the compute
device `cpu:0` instead (as CUDA's says `cuda:0`), so those are device tensors and device moves, and
what DeepSpeed really reads on the host (`.cpu()`, `.item()`, ...) is counted like anything else.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import traceback
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

COMPUTE_DEVICE = torch.device("cpu", 0)  # the job's device while counting; plain "cpu" is the host

aten = torch.ops.aten
ALWAYS_SYNC = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.bincount.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.equal.default,
    aten.is_nonzero.default,
}
BOOL_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def _is_compute_device(device) -> bool:
    device = torch.device(device) if isinstance(device, str) else device
    return isinstance(device, torch.device) and device.index is not None


def _is_host_device(device) -> bool:
    device = torch.device(device) if isinstance(device, str) else device
    return isinstance(device, torch.device) and device.type == "cpu" and device.index is None


@contextlib.contextmanager
def deepspeed_names_the_compute_device():
    """DeepSpeed's accelerator (when DeepSpeed is in use) names `cpu:0` as its device, as CUDA's
    names `cuda:0`."""
    if "deepspeed.accelerator" not in sys.modules:
        yield
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        yield
        return
    name = str(COMPUTE_DEVICE)
    accelerator.device_name = lambda device_index=None: name
    accelerator.current_device_name = lambda: name
    try:
        yield
    finally:
        del accelerator.device_name, accelerator.current_device_name  # the class's methods again


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.on_device = WeakTensorKeyDictionary()
        self.events: list[tuple[str, str]] = []  # (what, where in our code)
        self.paused = 0

    # -- bookkeeping ------------------------------------------------------------------------------

    def is_device(self, t) -> bool:
        if isinstance(t, torch.Tensor) and t in self.on_device:
            return True
        local = getattr(t, "_local_tensor", None)  # a DTensor: its local piece
        return local is not None and local in self.on_device

    def mark(self, t) -> None:
        for leaf in tree_leaves(t):
            if isinstance(leaf, torch.Tensor):
                self.on_device[leaf] = True

    def unmark(self, t: torch.Tensor) -> None:
        self.on_device.pop(t, None)

    def seed(self, host: list[torch.Tensor]) -> None:
        """Every tensor alive now is on the device, but for `host`."""
        keep_on_host = {id(t) for t in host}
        with warnings.catch_warnings():  # isinstance() on some live objects warns of their deprecation
            warnings.simplefilter("ignore")
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for t in tensors:
            if id(t) not in keep_on_host:
                self.mark(t)

    def record(self, what: str) -> None:
        if self.paused:
            return
        frames = [
            f
            for f in traceback.extract_stack()[:-2]
            if "/tests/" not in f.filename and "site-packages/torch/" not in f.filename
        ]
        where = " <- ".join(f"{'/'.join(f.filename.rsplit('/', 2)[-2:])}:{f.lineno}" for f in frames[::-1][:4])
        self.events.append((what, where))

    @contextlib.contextmanager
    def pause(self):
        """Not counted (e.g. evaluation and checkpoints); tensors are still followed."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    # -- ops ----------------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_device = any(self.is_device(t) for t in inputs)
        if from_device and self._syncs(func, args, kwargs):
            self.record(str(func))
        if func is aten.copy_.default and not self.is_device(args[0]) and self.is_device(args[1]):
            self.record("copy_ to the host")
        out = func(*args, **kwargs)
        target = kwargs.get("device")
        if func.namespace == "c10d":
            self.mark(inputs)  # NCCL: every tensor of a collective is on the device
            self.mark(out)
        elif _is_compute_device(target) or (from_device and not _is_host_device(target)):
            self.mark(out)
            for arg, value in zip(func._schema.arguments, args):
                if arg.alias_info is not None and arg.alias_info.is_write:
                    self.mark(value)
        return out

    def _syncs(self, func, args, kwargs) -> bool:
        if func in ALWAYS_SYNC:
            return True
        if func is aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        if func.overloadpacket in {f.overloadpacket for f in BOOL_INDEXED}:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
        return False

    # -- host copies, which dispatch nothing on CPU ---------------------------------------------------

    @contextlib.contextmanager
    def counting(self):
        """Count inside this block (the dispatch mode and the wrapped Tensor methods)."""
        originals = {name: getattr(torch.Tensor, name) for name in ("cpu", "to", "tolist", "numpy")}
        counter = self

        def host_copy(t: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
            counter.record("device->host copy")
            if result is t:
                result = originals["to"](t, COMPUTE_DEVICE).clone()  # a distinct host object
            counter.unmark(result)
            return result

        def cpu(t, *args, **kwargs):
            result = originals["cpu"](t, *args, **kwargs)
            return host_copy(t, result) if counter.is_device(t) else result

        def to(t, *args, **kwargs):
            like = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("other")
            if like is not None:  # .to(other_tensor): where that one lives
                result = originals["to"](t, *args, **kwargs)
                to_host = not counter.is_device(like)
            else:
                target, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
                to_host = _is_host_device(target)
                if _is_compute_device(target):  # the same memory: no copy, as on a GPU for a tensor already there
                    options = {"dtype": dtype, "non_blocking": non_blocking, "copy": kwargs.get("copy", False)}
                    if memory_format is not None:
                        options["memory_format"] = memory_format
                    result = originals["to"](t, **options)
                    counter.mark(result)  # (also a host tensor moved there: it is the same object here)
                    return result
                result = originals["to"](t, *args, **kwargs)
            if to_host and counter.is_device(t):
                return host_copy(t, result)
            if not to_host and result is not t:
                counter.mark(result)
            return result

        def tolist(t):
            if counter.is_device(t):
                counter.record("Tensor.tolist")
            return originals["tolist"](t)

        def numpy(t, *args, **kwargs):
            if counter.is_device(t):
                counter.record("Tensor.numpy")
            return originals["numpy"](t, *args, **kwargs)

        real_device = torch._C.TensorBase.__dict__["device"]

        def device(t):
            where = real_device.__get__(t)
            return COMPUTE_DEVICE if where.type == "cpu" and counter.is_device(t) else where

        for name, fn in (("cpu", cpu), ("to", to), ("tolist", tolist), ("numpy", numpy)):
            setattr(torch.Tensor, name, fn)
        torch.Tensor.device = property(device)
        try:
            with deepspeed_names_the_compute_device(), self:
                yield self
        finally:
            del torch.Tensor.device
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
