"""Telling a refused write (a full disk, a read-only mount, a file size limit) apart from a bug. Standard library
only: the store uses it, and the training loop's snapshot writer (``training.save_atomic``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

# errnos that only a write gets: the disk (not the program) is what failed
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
DISK_FULL_BYTES = 1 << 20  # a write failed with less free than this on its filesystem: it was full
TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "iostream error")  # torch.save's when write() failed


def disk_refusal(probe: tuple) -> tuple[int, Path] | None:
    """(ENOSPC, path) for the first probed path on a (nearly) full filesystem, (EFBIG, path) for one that reached
    this process's file size limit (RLIMIT_FSIZE), else None: for errors that hide the errno (torch.save's
    RuntimeError) or the file (a failed write() names none)."""
    import resource
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    for p in map(Path, probe):
        with contextlib.suppress(OSError):
            if limit != resource.RLIM_INFINITY and p.is_file() and p.stat().st_size >= limit:
                return errno.EFBIG, p
        with contextlib.suppress(OSError):
            st = os.statvfs(p if p.is_dir() else p.parent)
            if st.f_bavail * st.f_frsize < DISK_FULL_BYTES or (st.f_files and st.f_favail == 0):
                return errno.ENOSPC, p
    return None
