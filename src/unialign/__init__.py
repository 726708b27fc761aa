"""unialign: cheap image-text retrieval by aligning pretrained unimodal models (S-SMKE)."""

from .model.factory import load

__version__ = "0.1.0"
__all__ = ["load", "__version__"]
