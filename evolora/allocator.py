"""Keep freed memory in the process, so that large tensors do not pay for fresh pages at every allocation.

glibc's `malloc` serves a request above its mmap threshold (128 KiB at first, raised as such blocks are freed,
but never past 32 MiB) with a fresh `mmap`, and gives it back with `munmap` when it is freed; it also hands
the free top of its heap back to the kernel once it exceeds the trim threshold. Every byte of such a block is
then a page fault the next time a tensor of that size is made, and the kernel zeroes each page first. A
training step or a scoring batch makes and frees the same large tensors over and over: a conventional model's
full softmax over 39k items ([256 x 39k] floats, 40 MB, above the 32 MiB cap), an LLM's activations (tens
of MB each for a batch of long prompts). `benchmarks/bench_allocator.py` measures it: on a 2-core EPYC with
AVX2, one thread, SmolLM2-135M's next-item training spent a third of its CPU time in the kernel (975k page
faults for two batches of 8), and with the thresholds raised its CPU time fell by a factor of 1.47 (no
faults at all); SASRec's full softmax over the CDs items by 1.24, LLM CTR scoring and training by 1.03-1.06.

`keep_freed_memory()` raises both thresholds (`mallopt`) so that blocks up to `LIMIT` come from the heap and
freed ones are reused rather than returned. Nothing computed changes (an allocator decides where a tensor
lives, not what it holds); the cost is that the process keeps the memory of its largest moments until it
exits, which a training or serving process reaches again at its next step anyway. The peak RSS stayed
within 4% (lower, in fact, in all three of the benchmark's workloads).

Called by the commands `evolora run` (and each `--jobs` worker), `evolora update` and `evolora serve`, which
own their process; not by the Python API (`run`, `update_run`), which leaves the caller's allocator alone: a
library user who wants the speed calls it. `EVOLORA_KEEP_FREED_MEMORY=0` leaves the allocator as it is.
Where the C library is not glibc (musl, macOS) there is no such call and nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

ENV = "EVOLORA_KEEP_FREED_MEMORY"
LIMIT = 1 << 30  # 1 GiB: blocks above it still get their own mapping (and go back at once)

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to `LIMIT`, once per process; whether they are raised now."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not is_glibc():
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, LIMIT))
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator is left as it is")
    _applied = ok
    return ok


def is_glibc() -> bool:
    """Whether this process runs on glibc (musl has `mallopt` only as a stub that does nothing)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # the name is unknown where the C library is not glibc (macOS)
        return False
