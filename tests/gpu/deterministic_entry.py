"""``python tests/gpu/deterministic_entry.py ARGS`` runs ``soilnet ARGS`` with the test encoders of
tests/train/toymodels.py registered and torch's deterministic algorithms on (cuDNN and cuBLAS kernels without
atomics; an op that has none warns), as a user who wants bitwise-reproducible GPU runs sets them."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

import torch  # noqa: E402
import toymodels  # noqa: E402, F401  (registers test_flat_cnn)

from soilnet.cli import main  # noqa: E402

if __name__ == "__main__":
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    sys.exit(main(sys.argv[1:]))
