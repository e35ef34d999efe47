"""SoilNet at scale: cross-modal contrastive pretraining and SOC regression on Landsat patches and climate."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("soilnet")  # setuptools-scm wrote it from git at install time
except PackageNotFoundError:  # a source tree run without being installed
    __version__ = "0+unknown"
