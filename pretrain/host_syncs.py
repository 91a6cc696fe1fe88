"""Count the host-device synchronisations of a piece of code, on any device (a CPU run included).

On a GPU the Python thread queues kernels and runs ahead of the device; it stops and waits for the device when it
needs a value that only the device has (``loss.item()``, ``if flag:``, ``float(norm)``), a shape that depends on
the data (``x[mask]``, ``nonzero``, ``unique``), or a blocking copy between host and device memory. Each such wait
drains the queue and leaves the GPU idle while Python catches up. ``torch.cuda.set_sync_debug_mode`` reports them,
on CUDA only; :class:`HostSyncCounter` (a ``TorchFunctionMode``) recognises the operations that cause them from
their arguments, so a CPU test can assert that a training step has none and say which line has one.

Counted (torch's documentation and ATen source: ``nonzero`` / ``argwhere`` "cause host-device synchronization",
``repeat_interleave``'s ``output_size`` "will avoid stream synchronization", ``torch.normal`` with a CUDA ``std``
synchronises; boolean indexing runs ``nonzero``; blocking copies end in ``cudaStreamSynchronize``):

- ``read``: a tensor's value to Python: ``item``, ``tolist``, ``numpy``, ``bool()`` / ``int()`` / ``float()`` /
  ``complex()`` / ``operator.index``, formatting and ``repr``, ``in``, ``__array__``, ``torch.is_nonzero``,
  ``torch.equal``, ``torch.allclose``.
- ``shape``: an output shape that depends on the values: ``nonzero``, ``argwhere``, ``where(condition)``,
  ``masked_select``, ``unique``, ``unique_consecutive``, ``bincount``, ``histc`` without a range, ``one_hot``
  without ``num_classes``, ``repeat_interleave`` with tensor repeats and no ``output_size``, ``normal`` with a
  tensor ``std``, and indexing with a boolean mask anywhere in the index (``x[mask]``, ``x[:, mask]``,
  ``index_put``); ``x[mask] = number`` is not counted (torch runs it as ``masked_fill_``, no sync).
- ``copy``: a blocking copy between host and device memory: ``.cpu()``, ``.to(other device)`` / ``.cuda()`` /
  ``copy_`` without ``non_blocking=True``, ``torch.tensor`` / ``as_tensor`` / ``new_tensor`` of host data onto a
  device, indexing a device tensor with a host index tensor or list. Counted only where they happen: a CPU run
  has no device copies, so zero there (``non_blocking=True`` from pageable memory is not counted: torch does not
  wait, though the driver may stage it synchronously; pinned memory avoids that).

On a CPU run (``count_cpu=True``, the default) the ``read`` and ``shape`` kinds count on CPU tensors too: the CPU
stands for the GPU the code will meet. What stays on the host on a GPU as well cannot be told apart then, except
the optimizers' step counters: ``torch.optim`` keeps them on the host (unless ``capturable`` / ``fused``), so
values that ``torch/optim`` reads from CPU tensors are not counted. On a GPU pass ``count_cpu=False``: only device
tensors count, and ``torch.cuda.set_sync_debug_mode("warn")`` is the cross-check.

Not seen: a sync inside a C++ kernel that is not in the list above, a sync inside a torch Python function that
is dispatched as one call (the mode sees the call, not its body: ``F.*`` functions, ``torch.functional.*``),
``torch.cuda.synchronize`` / stream and event waits, and ``torch.distributed`` collectives (NCCL's are
asynchronous; ``barrier`` and the ``*_object`` collectives do wait).

    with HostSyncCounter() as syncs:
        loss = model(views, step)["loss"]
        loss.backward()
    assert syncs.count == 0, syncs.sites()

    result, count, sites = count_host_syncs(lambda: train_step(...))
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode

T = TypeVar("T")
Tensor = torch.Tensor

_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_OPTIM_DIR = _TORCH_DIR + "optim" + os.sep
_OVERRIDES = str(Path(torch.overrides.__file__).resolve())
_THIS = str(Path(__file__).resolve())
_REPO = str(Path(__file__).resolve().parents[1]) + os.sep

# A tensor's value to Python.
_READS = {
    Tensor.item,
    Tensor.tolist,
    Tensor.numpy,
    Tensor.__bool__,
    Tensor.__int__,
    Tensor.__float__,
    Tensor.__complex__,
    Tensor.__index__,
    Tensor.__format__,
    Tensor.__repr__,
    Tensor.__contains__,
    Tensor.__array__,
    Tensor.is_nonzero,
    torch.is_nonzero,
    Tensor.equal,
    torch.equal,
    Tensor.allclose,
    torch.allclose,
}
# Output shapes that depend on the values.
_SHAPES = {
    Tensor.nonzero,
    torch.nonzero,
    Tensor.argwhere,
    torch.argwhere,
    Tensor.masked_select,
    torch.masked_select,
    Tensor.unique,
    torch.unique,
    Tensor.unique_consecutive,
    torch.unique_consecutive,
    Tensor.bincount,
    torch.bincount,
}
_INDEX_PUTS = {Tensor.index_put, Tensor.index_put_, torch.index_put, torch.index_put_}
_FACTORIES = {torch.tensor, torch.as_tensor, torch.asarray}


@dataclass(frozen=True)
class HostSync:
    """One counted operation: its kind (``read``, ``shape``, ``copy``), the torch function and where it was called
    (``file:line`` of the innermost frame outside torch)."""

    kind: str
    op: str
    site: str

    def __str__(self) -> str:
        return f"{self.site} {self.op} ({self.kind})"


class HostSyncCounter(TorchFunctionMode):
    """Context manager counting the operations that make the host wait for a GPU (see the module docstring).

    Args:
        count_cpu: count values read from, and data-dependent shapes of, CPU tensors too (a CPU run standing for
            a GPU one). False on a GPU: only device tensors count.
        record_sites: keep every :class:`HostSync` with its call site (``syncs``, ``sites()``).

    ``count``: the number so far; ``mark()`` closes a segment (e.g. one optimizer step) and ``segments()`` lists
    the counts between marks.
    """

    def __init__(self, count_cpu: bool = True, record_sites: bool = True):
        super().__init__()
        self.count_cpu, self.record_sites = count_cpu, record_sites
        self.count = 0
        self.syncs: list[HostSync] = []
        self._marks: list[int] = []

    def __enter__(self) -> HostSyncCounter:
        super().__enter__()
        return self

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self._record(kind, func)
        return func(*args, **kwargs)

    def mark(self) -> None:
        """End a segment here (``segments()``)."""
        self._marks.append(self.count)

    def segments(self) -> list[int]:
        """The counts between consecutive ``mark()`` calls (from the start to the first mark first)."""
        bounds = [0, *self._marks]
        return [b - a for a, b in pairwise(bounds)]

    def sites(self, start: int = 0, stop: int | None = None) -> Counter[str]:
        """``{"file:line op (kind)": count}`` of the syncs ``start:stop`` (in the order they happened)."""
        return Counter(str(sync) for sync in self.syncs[start:stop])

    def segment_sites(self, index: int) -> Counter[str]:
        """The sites of segment ``index`` (as ``segments()`` numbers them); needs ``record_sites``."""
        bounds = [0, *self._marks]
        return self.sites(bounds[index], bounds[index + 1])

    def _record(self, kind: str, func: Callable) -> None:
        self.count += 1
        if self.record_sites:
            self.syncs.append(HostSync(kind, _name(func), _site()))

    # --- which calls sync --------------------------------------------------------------------------------------

    def _counts_on(self, tensor: Tensor) -> bool:
        """Would reading this tensor (or a data-dependent shape of it) make the host wait for a GPU?"""
        kind = tensor.device.type
        if kind == "meta":
            return False
        if kind != "cpu":
            return True
        return self.count_cpu and not _caller().startswith(_OPTIM_DIR)

    def _kind(self, func: Callable, args: tuple, kwargs: dict) -> str | None:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        if func in _READS:
            return "read" if any(self._counts_on(t) for t in tensors) else None
        if func in _SHAPES:
            return "shape" if tensors and self._counts_on(tensors[0]) else None
        if func is Tensor.__getitem__:
            return self._getitem(args[0], args[1])
        if func is Tensor.__setitem__:
            return self._setitem(args[0], args[1], args[2])
        if func in _INDEX_PUTS:
            return self._index_put(args, kwargs)
        if func is torch.where:
            single = len(args) + len(kwargs) == 1
            return "shape" if single and self._counts_on(tensors[0]) else None
        if func in (Tensor.repeat_interleave, torch.repeat_interleave):
            return self._repeat_interleave(args, kwargs)
        if func in (Tensor.histc, torch.histc):
            return self._histc(args, kwargs)
        if func is torch.nn.functional.one_hot:
            classes = args[1] if len(args) > 1 else kwargs.get("num_classes", -1)
            return "shape" if classes < 0 and self._counts_on(args[0]) else None
        if func is torch.normal:
            std = args[1] if len(args) > 1 else kwargs.get("std")
            return "shape" if isinstance(std, Tensor) and self._counts_on(std) else None
        return self._copy(func, args, kwargs)

    def _getitem(self, tensor: Tensor, index: Any) -> str | None:
        entries = index if isinstance(index, tuple) else (index,)
        if any(_is_mask(entry) for entry in entries):
            return "shape" if self._counts_on(tensor) else None
        if tensor.device.type not in ("cpu", "meta") and any(_on_host(entry) for entry in entries):
            return "copy"  # a host index is copied to the device, blocking
        return None

    def _setitem(self, tensor: Tensor, index: Any, value: Any) -> str | None:
        entries = index if isinstance(index, tuple) else (index,)
        masks = [e for e in entries if _is_mask(e)]
        if masks:
            if _masked_fill(tensor, entries, value):
                return None
            return "shape" if self._counts_on(tensor) else None
        if tensor.device.type not in ("cpu", "meta") and any(_on_host(entry) for entry in entries):
            return "copy"
        return None

    def _index_put(self, args: tuple, kwargs: dict) -> str | None:
        tensor = args[0]
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        value = args[2] if len(args) > 2 else kwargs.get("values")
        accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
        if not any(_is_mask(i) for i in indices if i is not None):
            return None
        if not accumulate and _masked_fill(tensor, tuple(indices), value):
            return None
        return "shape" if self._counts_on(tensor) else None

    def _repeat_interleave(self, args: tuple, kwargs: dict) -> str | None:
        if kwargs.get("output_size") is not None:
            return None
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
        return "shape" if isinstance(repeats, Tensor) and self._counts_on(repeats) else None

    def _histc(self, args: tuple, kwargs: dict) -> str | None:
        low = args[2] if len(args) > 2 else kwargs.get("min", 0)
        high = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return "shape" if low == high and self._counts_on(args[0]) else None

    def _copy(self, func: Callable, args: tuple, kwargs: dict) -> str | None:
        """Blocking copies between host and device memory (only where a device is involved)."""
        if func is Tensor.cpu:
            return "copy" if args[0].device.type not in ("cpu", "meta") else None
        if func is Tensor.to:
            target, non_blocking = _to_target(args, kwargs)
            return "copy" if target is not None and _crosses(args[0].device, target) and not non_blocking else None
        if func is Tensor.cuda:
            target = torch.device("cuda") if len(args) < 2 or args[1] is None else _device(args[1])
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            return "copy" if _crosses(args[0].device, target) and not non_blocking else None
        if func is Tensor.copy_:
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            return "copy" if _crosses(args[0].device, args[1].device) and not non_blocking else None
        if func in _FACTORIES or func is Tensor.new_tensor:
            data = args[1] if func is Tensor.new_tensor else args[0]
            device = kwargs.get("device", args[0].device if func is Tensor.new_tensor else None)
            if device is None:
                return None
            source = data.device if isinstance(data, Tensor) else torch.device("cpu")
            return "copy" if _crosses(source, _device(device)) else None
        return None


def count_host_syncs(fn: Callable[[], T], count_cpu: bool = True) -> tuple[T, int, Counter[str]]:
    """``fn()`` under a :class:`HostSyncCounter` -> (its result, the number of syncs, ``{site: count}``)."""
    with HostSyncCounter(count_cpu=count_cpu) as counter:
        result = fn()
    return result, counter.count, counter.sites()


def _is_mask(entry: Any) -> bool:
    if isinstance(entry, Tensor):
        return entry.dtype in (torch.bool, torch.uint8)
    return isinstance(entry, list) and len(entry) > 0 and all(isinstance(e, bool) for e in entry)


def _on_host(entry: Any) -> bool:
    """An advanced index that lives in host memory (a CPU tensor or a Python sequence)."""
    if isinstance(entry, Tensor):
        return entry.device.type == "cpu" and entry.ndim > 0
    return isinstance(entry, (list, range)) or type(entry).__module__ == "numpy"


def _masked_fill(tensor: Tensor, entries: tuple, value: Any) -> bool:
    """Does torch run ``tensor[entries] = value`` as ``masked_fill_`` (no sync)? One mask on the tensor's device, no
    other tensor index, and a Python number, or (on a device) a one-element CPU tensor (ATen's
    ``canDispatchToMaskedFill``). On a CPU run a tensor value is counted: on a GPU it may be a device tensor."""
    tensors = [e for e in entries if isinstance(e, Tensor)]
    if len(tensors) != 1 or not _is_mask(tensors[0]) or tensors[0].device != tensor.device:
        return False
    if isinstance(value, (bool, int, float)):
        return True
    return (
        isinstance(value, Tensor) and value.numel() == 1 and value.device.type == "cpu" and tensor.device.type != "cpu"
    )


def _device(device: Any) -> torch.device:
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device)


def _crosses(source: torch.device, target: torch.device) -> bool:
    """A copy between host memory and a device's (meta: none)."""
    kinds = {source.type, target.type}
    return "cpu" in kinds and len(kinds) == 2 and "meta" not in kinds


def _to_target(args: tuple, kwargs: dict) -> tuple[torch.device | None, bool]:
    """``Tensor.to``'s target device (None: same device) and ``non_blocking``, from any of its signatures."""
    target, flags = None, []
    for arg in args[1:]:
        if isinstance(arg, Tensor):
            target = arg.device
        elif isinstance(arg, (torch.device, str, int)) and not isinstance(arg, bool):
            target = _device(arg)
        elif isinstance(arg, bool):
            flags.append(arg)
    if kwargs.get("device") is not None:
        target = _device(kwargs["device"])
    non_blocking = kwargs.get("non_blocking", flags[0] if flags else False)
    return target, non_blocking


def _frames():
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _caller() -> str:
    """File of the innermost frame outside this module and torch's dispatch: the code that called the op."""
    for frame in _frames():
        name = frame.f_code.co_filename
        if name not in (_THIS, _OVERRIDES):
            return name
    return ""


def _site() -> str:
    """``file:line`` of the innermost frame outside torch (installed packages from their folder, repository files
    relative to its root)."""
    for frame in _frames():
        name = frame.f_code.co_filename
        if name != _THIS and not name.startswith(_TORCH_DIR):
            if "site-packages" + os.sep in name:
                name = name.split("site-packages" + os.sep, 1)[1]
            elif name.startswith(_REPO):
                name = name[len(_REPO) :]
            return f"{name}:{frame.f_lineno}"
    return "?"


def _name(func: Callable) -> str:
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    qualname = qualname.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")
    return "torch.unique" if func is torch.unique else qualname
