"""Pin BLAS to one thread, the precondition of bit-deterministic kernels.

A threaded gemv splits a matrix's output rows among threads and the split changes a row's
bits (see `agents.kernels`), so every process that executes a model runs BLAS on one thread.
This is process-wide state (environment variables and the OpenBLAS C API, found through
ctypes), kept apart from the pure executor code that relies on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
from collections.abc import Callable

import numpy as np

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_blas_threads(threads: int = 1) -> int | None:
    """Make BLAS single-threaded, for this process and the processes it starts.

    A threaded gemv splits output rows among threads and the split changes a row's bits, so
    executors must run BLAS on one thread. The environment variables only take effect before
    numpy is imported (agent entrypoints set them first); for numpy's bundled OpenBLAS this
    also sets the count at run time through its C API. Returns the thread count OpenBLAS
    reports afterwards, or None when the BLAS library cannot be queried.
    """
    for var in BLAS_THREAD_VARS:
        os.environ[var] = str(threads)
    api = _openblas_api()
    if api is None:
        return None
    setter, getter = api
    setter(threads)
    return int(getter())


@functools.cache
def _openblas_api() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    libs_dir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs_dir, "*openblas*"))):
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(path)
            for prefix, suffix in (("scipy_", "64_"), ("", "64_"), ("", "")):
                setter = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    return None
