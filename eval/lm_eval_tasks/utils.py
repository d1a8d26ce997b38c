"""Dataset loader for the shipped tasks: `data_files` are read relative to this folder.

lm-eval hands `dataset_kwargs.data_files` to `datasets.load_dataset`, which resolves relative paths against the
current directory, so the YAMLs name this loader as their `custom_dataset` to run from any directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets


def load_json(data_files: dict[str, str], **_: Any) -> datasets.DatasetDict:
    """The JSONL splits named in the task's `dataset_kwargs.data_files`; lm-eval also passes task metadata."""
    here = Path(__file__).parent
    return datasets.load_dataset("json", data_files={split: str(here / f) for split, f in data_files.items()})
