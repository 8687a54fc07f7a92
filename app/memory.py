"""Keep the server's resident memory flat under load.

glibc gives each thread that allocates its own malloc arena and keeps freed memory in it; a server
whose worker threads each build and drop large tensors then grows round after round. Capping the
arenas and trimming the heaps now and then returns that memory to the system (both do nothing off glibc).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

M_ARENA_MAX = -8  # mallopt parameter, from glibc's malloc.h


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def keep_memory_flat(arenas: int = 2, trim_every_s: float = 10.0) -> bool:
    """Cap glibc's malloc arenas (call before the worker threads start) and trim the heaps every few seconds
    from a daemon thread; False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt(M_ARENA_MAX, arenas)

    def trim() -> None:
        while True:
            time.sleep(trim_every_s)
            libc.malloc_trim(0)

    threading.Thread(target=trim, name="malloc-trim", daemon=True).start()
    return True
