"""Reading and returning this process's memory, for the serving layer's budget measurements.

A load is measured as the growth, across it, of the bytes the C allocator has handed out and
not taken back (glibc's `mallinfo2`: in-use heap chunks plus mmapped ones), which is where
ONNX Runtime keeps weights, pre-packed copies and arenas. The resident set size would be the
obvious measure, but it lies both ways: a load that reuses pages freed by an eviction barely
grows it (measured 30 MiB for a model that holds 58), and concurrent requests' buffers inflate
it. Loads run one at a time, so the growth is the load's; without glibc the resident set is the
fallback. After an unload the allocator is asked to give freed pages back to the system
(glibc keeps them otherwise). Never imports the engines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from functools import cache

import psutil

log = logging.getLogger(__name__)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def resident_bytes() -> int:
    """This process's resident set size."""
    return int(psutil.Process().memory_info().rss)


def allocated_bytes() -> int:
    """Bytes the C allocator has handed out and not taken back (glibc), else the resident set."""
    library = _libc()
    mallinfo2 = getattr(library, "mallinfo2", None) if library is not None else None
    if mallinfo2 is None:
        return resident_bytes()
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return int(info.uordblks + info.hblkhd)


def available_bytes() -> int:
    """Memory the system could give out now without swapping."""
    return int(psutil.virtual_memory().available)


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        library = ctypes.CDLL(name)
        library.malloc_trim.argtypes = [ctypes.c_size_t]
        return library
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def give_back_memory(*, collect: bool = False) -> None:
    """Return free heap pages to the system (glibc `malloc_trim`). `collect`: first collect
    garbage cycles, so that what an unloaded model's objects held is freed now; costly in a
    process with many objects, so only after an unload."""
    if collect:
        gc.collect()
    library = _libc()
    if library is not None:
        library.malloc_trim(0)
