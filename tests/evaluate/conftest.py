"""Fixtures of the evaluation tests: the tiny labelled shards of :mod:`labelled_kit`."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from labelled_kit import finetuned_dir, kit, labelled_shards  # noqa: E402

__all__ = ["finetuned_dir", "kit", "labelled_shards"]
