"""raysemi: find the best semi-supervised method and hyperparameters for 2D medical image
segmentation with scarce labels. Strategies share one loop; Ray Tune searches; MLflow records."""

from raysemi.config import TrainConfig, load_yaml, save_yaml

__version__ = "0.1.0"
__all__ = ["TrainConfig", "load_yaml", "save_yaml", "__version__"]
