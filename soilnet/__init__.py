"""SoilNet at scale: cross-modal contrastive pretraining and SOC regression on Landsat patches and climate."""

__version__ = "0.1.0"
