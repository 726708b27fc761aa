"""unialign: cheap image-text retrieval by aligning pretrained unimodal models (S-SMKE)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def __getattr__(name: str) -> Any:
    # `unialign.load` imports torch, timm and transformers (seconds); the command line's help and
    # its errors must not wait for them, so the model library is imported on first use.
    if name == "load":
        from .model.factory import load

        return load
    raise AttributeError(f"module 'unialign' has no attribute {name!r}")
