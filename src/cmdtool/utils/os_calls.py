"""The system calls cmdtool makes through ctypes, in one place, each with a portable fallback.

- :func:`exchange_paths`: ``renameat2(RENAME_EXCHANGE)`` (Linux >= 3.15, glibc >= 2.28), an atomic swap of two
  paths. Fallback: returns False, and the caller swaps with two renames and a recovery step
  (:func:`cmdtool.store.rechunk.swap_in`).
- :func:`release_mapped_pages`: ``madvise(MADV_DONTNEED)`` on pages mapped from a file, which hands them back
  at once (the data stay in the file). Fallback: returns False, and the pages stay resident until the mapping is
  closed, as without the call.

Neither changes anything process-wide. Where the C library, the function or (for the swap) the filesystem's
support is missing, the call returns False; it never raises for that.
"""

from __future__ import annotations

import functools
import os

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library the process is linked with (None where ctypes cannot open it, e.g. on Windows)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError, TypeError):
        return None


def _function(name: str, restype, argtypes):
    libc = _libc()
    try:
        function = getattr(libc, name) if libc is not None else None
    except AttributeError:  # a C library without it (glibc < 2.28 has no renameat2; macOS has neither)
        return None
    if function is not None:
        function.restype, function.argtypes = restype, argtypes
    return function


def exchange_paths(a, b) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where the system or the filesystem cannot (nothing
    changed then)."""
    import ctypes

    renameat2 = _function("renameat2", ctypes.c_int,
                          [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
    if renameat2 is None:
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def release_mapped_pages(address: int, length: int) -> bool:
    """Hand back the pages of ``[address, address + length)`` (page-aligned, mapped from a file: never call it
    on anonymous memory, whose contents it would drop); False where the call is unavailable or failed (the
    pages then stay resident until unmapped)."""
    import ctypes
    import mmap

    advice = getattr(mmap, "MADV_DONTNEED", None)
    madvise = _function("madvise", ctypes.c_int, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    if advice is None or madvise is None:
        return False
    return madvise(address, length, advice) == 0


__all__ = ["exchange_paths", "release_mapped_pages"]
