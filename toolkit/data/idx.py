"""Reader for the IDX format of MNIST and its drop-ins (Fashion-MNIST, KMNIST ...)."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GET_DATA = ("Download the four IDX .gz files of MNIST (or Fashion-MNIST, KMNIST: same format) "
            "into that folder, or give a hub dataset name (data.hub_name) on a machine with "
            "internet access.")


class DataError(RuntimeError):
    """Missing or corrupt data; the message names the path and how to get the data."""


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (gzipped or raw): magic ``0 0 dtype ndim``, big-endian dims, data."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist. {GET_DATA}")
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"data file {path} is corrupt or truncated ({e}). Delete it and download "
                        f"it again. {GET_DATA}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()}). {GET_DATA}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{path} is truncated or padded: header says {dims} ({expected} bytes) "
                        f"but the file holds {len(raw)} bytes. Download it again. {GET_DATA}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def find_split(root: Path, split: str) -> tuple[Path, Path]:
    """Image and label files of ``split`` ('train' or 't10k'), in any usual naming."""
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        names = [f"{split}-{kind}-ubyte.gz", f"{split}-{kind}-ubyte",
                 f"{split}-{kind.replace('-', '.')}-ubyte.gz", f"{split}-{kind.replace('-', '.')}-ubyte"]
        hit = next((root / n for n in names if (root / n).is_file()), None)
        if hit is None:
            raise DataError(f"no {names[0]} in {root}. {GET_DATA}")
        found.append(hit)
    return found[0], found[1]
