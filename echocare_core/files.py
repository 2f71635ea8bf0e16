"""Files written whole or not at all: the one way the toolkit writes a file that something else reads."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["fsync", "write_atomic"]


def write_atomic(
    path: str | os.PathLike,
    content: str | bytes | Callable[[Path], object],
    *,
    mode: int = 0o644,
    durable: bool = False,
) -> Path:
    """Write `path` whole or not at all: into a hidden temporary file beside it (one per process), then renamed
    over it, so a reader or a crash sees the old file or the new one, never part of one.

    Args:
        content: text (UTF-8), bytes, or a function that writes the temporary file it is given (e.g. safetensors'
            `save_file`, matplotlib's `savefig`).
        mode: the permissions of a file written from text or bytes (0o600 for keys and ledgers).
        durable: fsync the file and its folder before returning (records that must survive a power cut).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(content):
            content(tmp)
        else:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync(path.parent)
    return path


def fsync(path: Path) -> None:
    """Make a file or folder durable (its data, or its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
