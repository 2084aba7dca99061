"""Peak tensor memory on any device, CPU included.

On CUDA, `torch.cuda.max_memory_allocated` answers "how much memory did training need". On a CPU
there is no such counter: the process RSS holds the interpreter, the libraries and the allocator's
free lists, hundreds of MiB that swamp a small model's tensors. `TensorMemory` counts what the
CUDA counter counts, device-independently: the bytes of every tensor storage that a torch op
reads or writes inside the context, from the moment it is first seen until it is freed, and the
peak of their sum. Weights, LoRA parameters, gradients, optimizer moments, the activations that
autograd saves and temporaries are all counted; the allocator's rounding and caching are not.

    with TensorMemory() as mem:
        train_step()
    mem.peak_bytes

A storage created before the context is counted from its first use inside it (so frozen weights
loaded earlier count as soon as the forward reads them); one never used inside it is not counted.
Ops run on other threads are not seen (dispatch modes are per thread), but what those threads
produce is counted once the tracked thread uses it. Tracking costs a Python call per op: use it
for measurements, not for production training.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages seen by torch ops inside the context."""

    def __init__(self, devices: tuple[str, ...] = ("cpu", "cuda")):
        super().__init__()
        self.devices = devices
        self.current_bytes = 0
        self.peak_bytes = 0
        self._live: dict[int, weakref.ref] = {}

    def _see(self, value) -> None:
        if not isinstance(value, torch.Tensor) or value.device.type not in self.devices:
            return
        storage = value.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        size = storage.nbytes()
        # torch keeps one Python object per live storage, so the weakref dies with the storage
        self._live[key] = weakref.ref(storage, lambda _ref, key=key, size=size: self._free(key, size))
        self.current_bytes += size
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes

    def _free(self, key: int, size: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current_bytes -= size

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten((args, kwargs, out))[0]:
            self._see(value)
        return out
