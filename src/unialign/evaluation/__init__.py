"""Evaluation of image-text models: retrieval, zero-shot, linear probe, fine-tuning, reports.

Nothing heavy is imported here (the metrics import torch on first use), so `unialign`'s command
line starts fast; the model adapters are in `unialign.evaluation.models` (`load_eval_model`,
`EvalModel`), the tasks in their own modules.
"""

from __future__ import annotations

from typing import Any

from unialign.evaluation.specs import EvalError

__all__ = ["EvalError", "recall_at_k", "retrieval_metrics", "retrieval_ranks"]


def __getattr__(name: str) -> Any:
    if name in ("recall_at_k", "retrieval_metrics", "retrieval_ranks"):
        from unialign.evaluation import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module 'unialign.evaluation' has no attribute {name!r}")
