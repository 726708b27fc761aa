"""Batch assembly: drop bad samples, stack images, tokenize captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from unialign.data.datasets import Sample, is_bad
from unialign.data.device_decode import collate_planned


class Collator:
    """``collate_fn`` for the datasets of this package (picklable, runs in the workers).

    Returns a dict with

    - ``image`` (B, 3, H, W): uint8 (``data.normalize_on_device``) or normalised float; with
      ``data.decode: device`` only the host-decoded rows, plus ``image_slots`` and ``jpeg``
      (see :func:`unialign.data.device_decode.collate_planned`);
      ``teacher_image`` (B, 3, H', W') float, when the samples have one
    - ``input_ids``, ``attention_mask`` (B, L) long, padded to the longest caption (<= max_length),
      rounded up to ``pad_to_multiple_of`` (fewer shapes for torch.compile, aligned GPU kernels)
    - ``image_id`` (B,) long: equal ids mark captions of the same image
    - ``index`` (B,) long: dataset positions, only for map-style datasets
    - ``captions`` list[str], ``size`` int (= B)
    - ``n_skipped`` int and ``skipped`` list of (name, reason) for the dropped bad samples

    B can be smaller than the batch size, and 0 when every sample was bad: then the tensors
    are empty (``image`` is (0, 3, 0, 0), no ``teacher_image``). Callers should check
    ``batch["size"] == 0`` and skip the step (still accounting ``n_skipped``).
    """

    def __init__(self, tokenizer: Any, max_length: int, pad_to_multiple_of: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, items: Sequence[Sample]) -> dict[str, Any]:
        good = [it for it in items if not is_bad(it)]
        skipped = [(it["bad"], it["reason"]) for it in items if is_bad(it)]
        batch: dict[str, Any] = {"size": len(good), "n_skipped": len(skipped), "skipped": skipped,
                                 "captions": [it["caption"] for it in good]}
        if not good:
            empty = torch.zeros(0, 0, dtype=torch.long)
            batch.update(image=torch.zeros(0, 3, 0, 0), input_ids=empty, attention_mask=empty.clone(),
                         image_id=torch.zeros(0, dtype=torch.long))
            return batch
        tokens = self.tokenizer(batch["captions"], padding="longest", truncation=True, max_length=self.max_length,
                                pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        if any("jpeg" in it for it in good):  # data.decode: device; DeviceDecoder finishes after the copy
            batch.update(collate_planned(good))
        else:
            batch["image"] = torch.stack([it["image"] for it in good])
        if all("teacher_image" in it for it in good):
            batch["teacher_image"] = torch.stack([it["teacher_image"] for it in good])
        batch["input_ids"] = tokens["input_ids"]
        batch["attention_mask"] = tokens["attention_mask"]
        batch["image_id"] = torch.tensor([it["image_id"] for it in good], dtype=torch.long)
        if all("index" in it for it in good):
            batch["index"] = torch.tensor([it["index"] for it in good], dtype=torch.long)
        return batch
