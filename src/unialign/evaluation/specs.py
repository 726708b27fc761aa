"""Task tables and fine-tuning recipes: plain data with no torch import, so the command line can
offer choices and show defaults without loading the model stack on every `unialign` call."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal


class EvalError(ValueError):
    """Unusable evaluation input (model spec, dataset layout, file); the message names it."""


FORMATS: tuple[str, ...] = ("folder", "imagenet", "cifar10", "cifar100")  # classification dataset layouts


@dataclass
class FinetuneConfig:
    """Optimisation settings; the defaults are the image recipe (GLUE has its own, `GLUE_DEFAULTS`)."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05  # not on biases, norms, embeddings, tokens
    warmup_fraction: float = 0.1
    schedule: Literal["cosine", "linear"] = "cosine"  # decay after warm-up
    grad_clip: float | None = 1.0
    label_smoothing: float = 0.1  # classification losses only
    precision: Literal["32", "bf16"] = "32"  # bf16 autocast (use on GPUs with bf16)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "warmup_fraction": 0 <= self.warmup_fraction < 1,
                  "label_smoothing": 0 <= self.label_smoothing < 1,
                  "schedule": self.schedule in ("cosine", "linear"), "precision": self.precision in ("32", "bf16")}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise EvalError(f"invalid fine-tuning setting {bad[0]}={getattr(self, bad[0])!r}")


def with_overrides(base: FinetuneConfig, **overrides: Any) -> FinetuneConfig:
    """`base` with the non-None values of `overrides` (how the CLI applies only the flags a user gave)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class GlueTask:
    text_keys: tuple[str, str | None]  # one sentence, or a pair
    num_labels: int  # 1: regression (STS-B)
    metrics: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(("sentence", None), 2, ("mcc",)),
    "sst2": GlueTask(("sentence", None), 2, ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("f1", "accuracy")),
    "qqp": GlueTask(("question1", "question2"), 2, ("f1", "accuracy")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("accuracy",), ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(("question", "sentence"), 2, ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("accuracy",)),
}

# BERT's GLUE recipe (Devlin et al. 2019): 3 epochs, batch 32, lr 2e-5 (of 2/3/5e-5), linear decay.
GLUE_DEFAULTS = FinetuneConfig(epochs=3, batch_size=32, lr=2e-5, weight_decay=0.01, warmup_fraction=0.1,
                               schedule="linear", label_smoothing=0.0)
