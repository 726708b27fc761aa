"""Evaluation of image-text models: retrieval, zero-shot, linear probe, fine-tuning, reports.

Only light modules are imported here, so `unialign`'s command line starts fast; the model
adapters are in `unialign.evaluation.models` (`load_eval_model`, `EvalModel`), the tasks in
their own modules.
"""

from unialign.evaluation.retrieval import recall_at_k, retrieval_metrics, retrieval_ranks
from unialign.evaluation.specs import EvalError

__all__ = ["EvalError", "recall_at_k", "retrieval_metrics", "retrieval_ranks"]
