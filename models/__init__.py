"""Model side of DiscoLens: loading, the shapes world, the bundled model and its training, attention capture."""
from .loading import ModelLoadError, load_pipeline

__all__ = ["load_pipeline", "ModelLoadError"]
