"""What every resumable sweep script does first: set torch's threads and reopen its results."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def open_sweep(out: str | Path, threads: int | None, empty: Any) -> tuple[Path, Path, Any]:
    """``(out folder, results.json path, results so far)``: a rerun skips finished runs.
    ``threads`` (if set) becomes torch's intra-op thread count."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    return out, path, json.loads(path.read_text()) if path.is_file() else empty
