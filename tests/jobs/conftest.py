"""Fixtures of the job tests: the tiny labelled shards of tests/evaluate/labelled_kit.py."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))

from labelled_kit import finetuned_dir, kit, labelled_shards  # noqa: E402

__all__ = ["finetuned_dir", "kit", "labelled_shards"]
