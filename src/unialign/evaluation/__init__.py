"""Evaluation metrics for image-text alignment."""

from unialign.evaluation.retrieval import recall_at_k, retrieval_metrics, retrieval_ranks

__all__ = ["recall_at_k", "retrieval_metrics", "retrieval_ranks"]
