"""SoilNet at scale: cross-modal contrastive pretraining and SOC regression on Landsat patches and climate.

The notebook API (:mod:`soilnet.api`, docs/api.md) is reached as ``soilnet.load_model``, ``soilnet.open_shards``
and ``soilnet.load_encoders``; it is imported on first use (PEP 562), so ``import soilnet`` stays light (no
torch) and the modules below the API may ``import soilnet`` for its version without importing the API.
"""

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("soilnet")  # setuptools-scm wrote it from git at install time
except PackageNotFoundError:  # a source tree run without being installed
    __version__ = "0+unknown"

API = ("load_model", "open_shards", "load_encoders")


def __getattr__(name: str):
    if name in API:
        return getattr(importlib.import_module("soilnet.api"), name)
    raise AttributeError(f"module 'soilnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
