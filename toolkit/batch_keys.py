"""The key names a dict batch (or a dataset's columns) may use for the model inputs and the
targets: one list each, read by the modules, the mixing callbacks, the step controls and the
data modules alike (they kept five diverging lists before)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

# the first one present wins; "x"/"y" (the toolkit's own) first, then Hugging Face's and
# torchvision/datasets' usual names
INPUT_KEYS = ("x", "input_ids", "inputs_embeds", "image", "images", "img", "pixel_values",
              "input", "inputs")
TARGET_KEYS = ("y", "labels", "label", "target", "targets")


def first_key(names: Iterable[str], keys: tuple[str, ...]) -> str | None:
    """The first of ``keys`` among ``names`` (a dict's keys, a dataset's columns), else None."""
    names = set(names)
    return next((k for k in keys if k in names), None)


def input_target_keys(batch: Mapping[str, Any], owner: str,
                      input_key: str | None = None, target_key: str | None = None
                      ) -> tuple[str, str]:
    """The (input, target) keys of a dict batch; a clear error naming ``owner`` and the
    accepted names when either is missing."""
    xk = input_key or first_key(batch, INPUT_KEYS)
    yk = target_key or first_key(batch, TARGET_KEYS)
    if xk not in batch or yk not in batch:
        raise KeyError(f"{owner}: batch dict keys {sorted(batch)} name no input/target pair; "
                       f"inputs are one of {INPUT_KEYS}, targets one of {TARGET_KEYS} (or use "
                       f"'x' and 'y')")
    return xk, yk
