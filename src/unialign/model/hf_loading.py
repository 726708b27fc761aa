"""Loading transformers models without the noise: no progress bar for a local folder, and the load
report (UNEXPECTED pooler and pre-training heads, by design) shown only when weights are missing."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoModel, PretrainedConfig


@contextmanager
def quiet_local_load(name: str) -> Iterator[None]:
    """transformers draws a "Loading weights" bar for every load: for a local folder it lasts under
    a second and only looks like work in progress; hub downloads keep their bars."""
    from transformers.utils import logging as hf_logging

    if not Path(name).expanduser().is_dir() or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()


class _HeldLoadReport(logging.Filter):
    """Keeps transformers' load report back (it is logged as a warning) until the load is judged."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.records.append(record)
            return False
        return True


def text_model_from_pretrained(name: str, **config_overrides: Any) -> nn.Module:
    """The encoder only. Checkpoint weights beyond it (the pooler, pre-training heads) are unused by
    design, and transformers would report them as UNEXPECTED on every load: its report is shown only
    when weights are missing or the load fails."""
    kwargs = {"attn_implementation": "sdpa", "output_loading_info": True, **config_overrides}
    report = logging.getLogger("transformers.modeling_utils")
    held = _HeldLoadReport()
    report.addFilter(held)
    missing = True  # until the load succeeds
    try:
        with quiet_local_load(name):
            try:
                model, info = AutoModel.from_pretrained(name, add_pooling_layer=False, **kwargs)
            except TypeError:  # models without a pooler do not take the flag
                model, info = AutoModel.from_pretrained(name, **kwargs)
        missing = bool(info["missing_keys"])
    finally:
        report.removeFilter(held)
        for record in held.records if missing else []:
            report.handle(record)
    return model


def text_model_from_config(config: PretrainedConfig) -> nn.Module:
    config._attn_implementation = "sdpa"
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_config(config)

