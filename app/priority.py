"""Photo work at a lower CPU priority, so that searches pre-empt it on a busy machine.

Uploads and the inspector take hundreds of milliseconds of CPU; searches take tens. Both queues run
at once, and with equal priority a search shares the cores with whatever photo work is running.
Photo work runs here instead, in one thread whose scheduling priority is lowered (Linux schedules
each thread by its own nice value, and the threads it starts, such as its OpenMP workers, inherit it),
so the kernel gives the searches the cores first and the photo work the rest. ONNX Runtime's worker is
started by the thread that first extracts regions: this one, or on a first start the gallery's indexing.
"""
from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

PHOTO_WORK_NICENESS = 10  # CFS weight 110 against 1,024 for a search thread: about 90% of a shared core goes to searches


def lower_this_threads_priority(step: int = PHOTO_WORK_NICENESS) -> None:
    """Add `step` to the calling thread's nice value (Linux: per thread; at most 19). Where the platform has no
    per-thread priorities or refuses, photo work runs at normal priority."""
    try:
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + step))
    except (AttributeError, OSError):
        pass


LANE_NAME = "photo-work"
_photo_lane = ThreadPoolExecutor(1, thread_name_prefix=LANE_NAME, initializer=lower_this_threads_priority)


def in_photo_lane(fn):
    """Run `fn` in the low-priority photo-work thread; the caller waits for its result (or its exception).
    Called from that thread (photo work calling photo work), `fn` runs at once: one thread cannot wait on itself."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if threading.current_thread().name.startswith(LANE_NAME):
            return fn(*args, **kwargs)
        return _photo_lane.submit(fn, *args, **kwargs).result()

    return run
