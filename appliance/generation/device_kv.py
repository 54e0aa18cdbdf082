"""The KV cache in GPU memory, for a decoder that runs on ONNX Runtime's CUDA provider.

Same layout and operations as the host `KvStore` (model_runner.py): one buffer per layer of
[max_slots, kv_heads, max_len, head_dim], a batch bound as a contiguous range of slots, both as
past input and present output, so GroupQueryAttention writes each new position in place on the
device and nothing crosses to the host per step but the token ids in and the logits out.

The buffers are OrtValues that ONNX Runtime allocates on the device; a slot range is bound by
address (base + first * slot bytes). Copies that are not forward passes — compaction moves, and
the prefix cache's saves and restores, whose entries live in host memory — go through
`DeviceMemory`: NVIDIA's runtime (`CudaMemory`, loaded from the library that onnxruntime-gpu's
CUDA provider already brought into the process) on a GPU, or `HostMemory`, a stand-in that
copies host memory the same way so the store's address arithmetic runs in tests on a box
without a GPU.

Device memory is reserved up front for every slot's whole context (there is no paging back to
the system as on the host), so the engine sizes the context to fit (`fit_context`).
"""

from __future__ import annotations

import ctypes
from typing import Protocol

import numpy as np
import onnxruntime as ort

from appliance.errors import ModelRejected
from appliance.generation.model_runner import KvGeometry, NamePair

#: cudaMemcpyKind cudaMemcpyDefault: the direction follows from the addresses (unified addressing).
_COPY_DEFAULT = 4
#: Sonames of the CUDA runtime, newest first; the CUDA provider loaded one of them already.
_CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_ELEMENT_TYPES = {np.dtype(np.float16): np.float16, np.dtype(np.float32): np.float32}


class DeviceMemory(Protocol):
    """Copies between device and host memory, by address."""

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        """Copy `height` rows of `width` bytes; row i starts at base + i * pitch on each side."""
        ...

    def free_bytes(self) -> int | None:
        """Free device memory, when the device can say."""
        ...


class CudaMemory:
    """NVIDIA's runtime through ctypes: cudaMemcpy2D and cudaMemGetInfo on one device."""

    def __init__(self, device_id: int) -> None:
        self.device_id = device_id
        self._lib = _load_cudart()
        self._lib.cudaMemcpy2D.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int]
        self._lib.cudaMemGetInfo.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
        self._lib.cudaSetDevice.argtypes = [ctypes.c_int]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what} failed with CUDA error {code}")

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        # The calling thread may not have this device current yet (the engine thread copies).
        self._check(self._lib.cudaSetDevice(self.device_id), "cudaSetDevice")
        self._check(self._lib.cudaMemcpy2D(dst, dst_pitch, src, src_pitch, width, height, _COPY_DEFAULT), "cudaMemcpy2D")
        # A device-to-device copy returns before it is done, and ONNX Runtime's next run goes
        # on a stream of its own that would not wait for it: finish it here.
        self._check(self._lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def free_bytes(self) -> int | None:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._check(self._lib.cudaSetDevice(self.device_id), "cudaSetDevice")
        self._check(self._lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return int(free.value)


def _load_cudart() -> ctypes.CDLL:
    for name in _CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise ModelRejected("the CUDA runtime library (libcudart) cannot be loaded", field="providers")


class HostMemory:
    """Stand-in for `CudaMemory` on a box without a GPU: the same row copies, in host memory.
    Tests drive `DeviceKvStore` with it over OrtValues on the CPU."""

    def copy_rows(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int) -> None:
        for row in range(height):
            ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)

    def free_bytes(self) -> int | None:
        return None


class DeviceKvStore:
    """KV buffers on a device (see the module docstring); `device` as ONNX Runtime names it."""

    def __init__(self, geometry: KvGeometry, max_slots: int, max_len: int, *, device: str, device_id: int, memory: DeviceMemory) -> None:
        self.geometry = geometry
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = device
        self.device_id = device_id
        self._memory = memory
        self._element = _ELEMENT_TYPES[geometry.dtype]
        self._shape = [max_slots, geometry.num_kv_heads, max_len, geometry.head_dim]
        self._row_bytes = max_len * geometry.head_dim * geometry.dtype.itemsize  # one head of one slot
        self._slot_bytes = geometry.num_kv_heads * self._row_bytes
        try:
            self._buffers = [
                ort.OrtValue.ortvalue_from_shape_and_type(self._shape, self._element, device, device_id)
                for _ in range(2 * geometry.num_layers)
            ]
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped allocation errors
            raise ModelRejected(
                f"the KV cache ({self.nbytes / 2**30:.1f} GiB for {max_slots} sequences of {max_len} tokens) "
                f"cannot be allocated on {device}:{device_id}: {str(exc).splitlines()[0]}",
                field="generation.max_running_sequences",
            ) from None
        self._addresses = [buffer.data_ptr() for buffer in self._buffers]

    @property
    def nbytes(self) -> int:
        return 2 * self.geometry.num_layers * self.max_slots * self._slot_bytes

    def bind(self, binding: ort.IOBinding, keys: list[NamePair], values: list[NamePair], first: int, rows: int) -> list[object]:
        shape = [rows, *self._shape[1:]]
        offset = first * self._slot_bytes
        for (name_in, name_out), address in zip((*keys, *values), self._addresses, strict=True):
            binding.bind_input(name_in, self.device, self.device_id, self._element, shape, address + offset)
            binding.bind_output(name_out, self.device, self.device_id, self._element, shape, address + offset)
        return [self._buffers]

    def move_slot(self, source: int, target: int, length: int) -> None:
        width = length * self.geometry.head_dim * self.geometry.dtype.itemsize
        heads = self.geometry.num_kv_heads
        for address in self._addresses:
            self._memory.copy_rows(
                address + target * self._slot_bytes, self._row_bytes, address + source * self._slot_bytes, self._row_bytes, width, heads
            )

    def forget(self, slot: int) -> None:
        """Nothing to give back: device memory stays reserved for the slot's whole context."""

    def read(self, slot: int, length: int) -> list[np.ndarray]:
        """Host copies of one slot's first `length` positions, K then V per layer (prefix cache)."""
        width = length * self.geometry.head_dim * self.geometry.dtype.itemsize
        heads, head_dim = self.geometry.num_kv_heads, self.geometry.head_dim
        saved = []
        for address in self._addresses:
            part = np.empty((heads, length, head_dim), self.geometry.dtype)
            if width:
                self._memory.copy_rows(part.ctypes.data, width, address + slot * self._slot_bytes, self._row_bytes, width, heads)
            saved.append(part)
        return saved

    def write(self, slot: int, saved: list[np.ndarray], length: int) -> None:
        """Put back what `read` returned, truncated to `length` positions."""
        width = length * self.geometry.head_dim * self.geometry.dtype.itemsize
        if not width:
            return
        for address, part in zip(self._addresses, saved, strict=True):
            part = np.ascontiguousarray(part, self.geometry.dtype)
            pitch = part.shape[1] * self.geometry.head_dim * self.geometry.dtype.itemsize
            self._memory.copy_rows(address + slot * self._slot_bytes, self._row_bytes, part.ctypes.data, pitch, width, self.geometry.num_kv_heads)


def fit_context(geometry: KvGeometry, max_slots: int, context: int, free_bytes: int | None, share: float) -> int:
    """The longest context (at most `context`) whose reservation for `max_slots` sequences
    takes no more than `share` of the device's free memory; `context` when free is unknown."""
    if free_bytes is None:
        return context
    per_position = max_slots * geometry.bytes_per_token
    return max(1, min(context, int(free_bytes * share) // per_position))
