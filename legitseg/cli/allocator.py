"""`legitseg run` keeps the memory it frees for its next image (glibc's allocator only).

By default glibc hands every block of 32 MB or more (and, past a high-water mark, the top of
its heap) back to the kernel when it is freed, and takes fresh pages for the next one. A run
allocates and frees the same large arrays for every batch and photograph: efficientnet's
expanded activations at batch 4 (57 MB), a 12 MP decode (36 MB), logits resized to the photo
(48 MB). Each fresh page is a page fault and a page of zeros: 2.1 million faults and 5 s of
kernel time in a 64-image torch run on the 2-core machine. With mmap for large blocks off and
the heap never trimmed, freed blocks are reused: 0.2 million faults, torch runs 23% (1024x768)
to 44% (12 MP) faster, ONNX Runtime runs 19% faster at 12 MP and the same at 1024x768, for
150-250 MB more peak memory, flat in the number of images (docs/benchmarks.md, "Memory
reuse").

Only the command line does this, once, before the models are built: a process that imports
legitseg keeps its allocator as it is. Set by the user, glibc's own settings win
(`GLIBC_TUNABLES` naming glibc.malloc, or any `MALLOC_*` variable), and
`LEGITSEG_MALLOC=default` leaves glibc's defaults (docs/user-guide.md, "Environment").
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from collections.abc import Mapping

log = logging.getLogger(__name__)

MALLOC_ENV = "LEGITSEG_MALLOC"
# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int: 2 GiB of free heap top before any is given back


def user_chose(environ: Mapping[str, str]) -> str | None:
    """Why the allocator is left as it is, or None to set it."""
    if environ.get(MALLOC_ENV, "").strip().lower() == "default":
        return f"{MALLOC_ENV}=default"
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    named = sorted(k for k in environ if k.startswith("MALLOC_"))
    return f"{named[0]} is set" if named else None


def reuse_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Keep freed blocks for reuse (no mmap for large blocks, no heap trimming); True if set.

    Does nothing off Linux, on a C library without mallopt (musl) or where the user chose.
    """
    env = os.environ if environ is None else environ
    why = user_chose(env)
    if why is not None or not sys.platform.startswith("linux"):
        log.debug("allocator left as it is: %s", why or sys.platform)
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
