"""Checkpoint files written to a temporary file in the same folder, then renamed over the
target: a process killed mid-write (SIGKILL, OOM killer, preemption) leaves the previous
checkpoint intact instead of a truncated ``last.ckpt`` that ``--ckpt_path last`` cannot load.

Lightning's own save stages the file through fsspec in the system temp folder and moves it;
where that folder is another filesystem (a tmpfs /tmp, a container volume) the move is a
copy into the target, which a kill can cut short. ``os.replace`` within one folder is atomic
on POSIX and Windows.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` such that ``path`` is either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialize first: a failure here leaves no file at all
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed process
        stale.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with :func:`atomic_save` for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if "://" in str(path):  # remote filesystems keep fsspec's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options "
                            f"for a local path; got {storage_options!r}")
        atomic_save(checkpoint, path)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``version_*/checkpoints/last*.ckpt`` of a run folder: a file, or the folder
    torch.distributed.checkpoint writes under ``--trainer.strategy fsdp2``; None if there is none."""
    found = [p for p in Path(run_dir).glob("version_*/checkpoints/last*.ckpt")
             if p.is_file() or (p / "meta.pt").is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None
