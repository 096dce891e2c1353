"""Files that hold state or secrets: created private, refused when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vetd.core.configfile import ConfigError


def create_private(path: Path | str) -> None:
    """Make sure ``path`` exists as a file only its owner can read and write (0600).

    Called before SQLite opens a database: SQLite creates the file with the
    process umask (0644 usually) and gives its ``-wal`` and ``-shm`` files the
    database file's mode, so creating it 0600 first keeps all three private.
    An existing file readable by others is narrowed to 0600.
    """
    path = str(path)
    if path == ":memory:" or path.startswith("file:"):
        return
    fd = os.open(path, os.O_CREAT | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if mode & 0o077:
            os.fchmod(fd, mode & 0o700)
    finally:
        os.close(fd)


def check_private(path: Path | str, where_: str) -> None:
    """Refuse a key, token or password file that its group or others may read or write."""
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError:
        return  # the reader reports a missing or unreadable file with its own message
    if mode & 0o077:
        raise ConfigError(f"{where_}: {path} has mode {mode:04o}; a secret must be readable by its owner "
                          f"only (chmod 600 {path})")
