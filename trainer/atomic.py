"""Publishing files whole: written under a temporary name, synced, then renamed into place.

The model repository (versions) and the experience log (shards) both publish this way, so a reader never sees
half a file. Python's `tempfile` makes its files 0600 and its directories 0700, private to the writer, and a
rename keeps that: on a shared volume the service (the Dockerfile's `phalanx` user) could not read a version a
trainer running as someone else wrote, nor an offline trainer the service's shards. `make_public` gives them
the modes an ordinary `open`/`mkdir` would have had under the process's umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    """The process's umask, read without changing it (os.umask sets as it reads; other threads may be
    creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def make_public(path: str | os.PathLike) -> None:
    """Give a temporary file 0666 and a temporary directory 0777, less the umask (usually 0644 / 0755)."""
    mode = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, mode & ~_umask())


def write_synced(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a new file and fsync it (the rename that publishes it comes after)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable; best effort (some filesystems refuse fsync on a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
