"""Publishing a finished folder atomically: the one rename-into-place that data builders share."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished folder `tmp` to `path`; an existing `path` is moved aside first and removed
    after, so a reader sees either the old folder or the new one, never a half-written one."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, path)
