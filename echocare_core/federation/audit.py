"""Audit logs: append-only JSON lines, each line flushed and fsynced, at the coordinator and at every site.

What a coordinator or a hospital must be able to show afterwards: the run and job hash, each round,
which sites took part, what each sent (tensor names, shapes, bytes, epsilon), what was refused or left
out and why. Lines carry reasons and metadata only, never sample data or file contents.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "manifest"]


def manifest(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Names and shapes of tensors (torch or numpy) and their total bytes: what left a site, without the values."""
    return {
        "tensors": {name: list(t.shape) for name, t in tensors.items()},
        "bytes": int(sum(t.nbytes if hasattr(t, "nbytes") else t.numel() * t.element_size() for t in tensors.values())),
    }


class AuditLog:
    """Append one JSON line per event to `path`; a line is on disk when the call returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
