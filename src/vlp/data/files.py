"""Building a dataset folder atomically and idempotently: what the emoji, scene and region-store
builders share.

    counts = build_folder(out, settings, lambda tmp: _build_into(tmp, ...), kind="an emoji dataset")
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


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


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, ensure_ascii=False, indent=1), encoding="utf-8")


def stored_counts(out: Path) -> dict | None:
    """The counts.json of a built folder (it carries the build's settings), or None."""
    try:
        return json.loads((Path(out) / "counts.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def build_folder(out: str | Path, settings: dict, build: Callable[[Path], dict], kind: str) -> tuple[dict, bool]:
    """-> (counts, built now?). A folder already built with the same `settings` is returned as is;
    otherwise `build(tmp)` fills a temporary folder next to `out` (writing counts.json with the
    settings), which is then renamed into place: an interrupted build leaves nothing half-done. A
    folder that exists but was not built by vlp is never overwritten."""
    out = Path(out)
    stored = stored_counts(out)
    if stored is not None and stored.get("settings") == settings and (out / "dataset.json").is_file():
        return stored, False
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and stored is None)):
        raise FileExistsError(f"{out} exists and is not {kind} built by vlp: choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        counts = build(tmp)
        done = stored_counts(out)          # an identical build a concurrent process finished first is kept
        if done is not None and done.get("settings") == settings:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts, True
