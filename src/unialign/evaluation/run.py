"""`unialign eval retrieval`: the Karpathy test protocol (or a manifest split) on any `EvalModel`."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.records import RetrievalSet, read_karpathy, read_karpathy_eval, read_manifest, retrieval_set
from .retrieval import metrics_from_ranks, retrieval_ranks
from .specs import EvalError

if TYPE_CHECKING:
    from .encode import PixelMemo
    from .models import EvalModel


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def result_header(task: str, model: str, dataset: str) -> dict[str, str]:
    """Fields every result JSON starts with, so `unialign report` can place it (row: model, column: dataset)."""
    return {"task": task, "model": model, "dataset": dataset}


def retrieval_dataset_name(path: str | Path) -> str:
    """`dataset_coco.json` -> `coco`, `dataset_flickr30k.json` -> `flickr30k`, else the file's stem."""
    stem = Path(path).stem
    return re.sub(r"^dataset_", "", stem)


DEFAULT_MAX_MISSING_FRACTION = 0.01


def check_missing(n_missing: int, n_total: int, skipped: list[tuple[str, str]], where: str,
                  max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION) -> None:
    """Refuse a gallery with more than `max_missing_fraction` of its images missing or unreadable:
    recall on the rest is not the benchmark's number (a smaller gallery scores higher)."""
    if n_total and n_missing > max_missing_fraction * n_total:
        path, reason = skipped[0] if skipped else ("?", "?")
        raise EvalError(f"{n_missing} of {n_total} images of {where} ({100 * n_missing / n_total:.1f}%) are missing "
                        f"or unreadable, more than --max-missing-fraction={max_missing_fraction:g} "
                        f"(e.g. {path}: {reason}); check --images, or raise --max-missing-fraction to score "
                        f"the rest")


def evaluate_retrieval_set(model: EvalModel, data: RetrievalSet, dataset: str, where: str, batch_size: int = 64,
                           num_workers: int = 0, progress: bool = True,
                           max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
                           rerank: int = 0, memo: PixelMemo | None = None,
                           query_bank: RetrievalSet | None = None) -> dict[str, Any]:
    """Recall@K both ways for one gallery (`where` names it in errors).

    Unreadable or missing images are dropped with their captions and counted; more of them than
    `max_missing_fraction` of the gallery is an :class:`EvalError`. The result states what was
    scored (``n_images``, ``n_captions``) and what was missing (``images_missing``,
    ``captions_missing``, ``skipped``).

    `rerank` K > 0 (a unialign model with an ITM head) also re-ranks each query's top K with the
    ITM head: the recalls stay the dual encoder's, the re-ranked ones go under ``reranked``, with
    ``rerank_k``, ``encode_rank_seconds`` and ``rerank_seconds``.

    `memo` (evaluation.encode.PixelMemo): shared by several models scored on the same set, each file
    is decoded and preprocessed once per preprocessing.

    `query_bank` (training images and captions, never the gallery's): the recalls also with query-bank
    normalisation (`evaluation.querybank`, at the model's logit scale), under ``query_bank``; the plain
    recalls stay where they are."""
    if rerank:
        from .itm_score import require_itm

        require_itm(model)  # before the encoding pass, not after it
    start = time.perf_counter()
    image_emb, kept, skipped = model.encode_images(data.images, batch_size, num_workers, progress, memo)
    if not kept:
        raise EvalError(f"no readable image in {where}" + (f" (e.g. {skipped[0][0]}: {skipped[0][1]})"
                                                            if skipped else ""))
    check_missing(len(data.images) - len(kept), len(data.images), skipped, where, max_missing_fraction)
    new_index = {old: new for new, old in enumerate(kept)}
    captions = [(c, new_index[i]) for c, i in zip(data.captions, data.caption_to_image) if i in new_index]
    text_emb = model.encode_texts([c for c, _ in captions], progress=progress)
    caption_to_image = torch.tensor([i for _, i in captions], dtype=torch.long)
    ranks = retrieval_ranks(image_emb, text_emb, caption_to_image)
    metrics = metrics_from_ranks(*ranks)
    if query_bank is not None:
        metrics["query_bank"] = _with_query_bank(model, image_emb, text_emb, caption_to_image, query_bank,
                                                 batch_size, num_workers, progress, memo)
    if rerank:
        metrics["encode_rank_seconds"] = time.perf_counter() - start
        metrics.update(_rerank(model, image_emb, text_emb, caption_to_image, ranks, rerank,
                               [data.images[i] for i in kept], [c for c, _ in captions], num_workers, progress))
    return {
        **result_header("retrieval", model.name, dataset),
        **metrics,
        "n_images": len(kept),  # scored
        "n_captions": len(captions),
        "images_missing": len(data.images) - len(kept),
        "captions_missing": len(data.captions) - len(captions),
        "max_missing_fraction": max_missing_fraction,
        "images_skipped": len(skipped),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }


def _with_query_bank(model: EvalModel, image_emb: torch.Tensor, text_emb: torch.Tensor,
                     caption_to_image: torch.Tensor, bank: RetrievalSet, batch_size: int, num_workers: int,
                     progress: bool, memo: PixelMemo | None) -> dict[str, Any]:
    """The recalls with each image's bias against the bank's captions and each caption's against its images."""
    from .querybank import querybank_bias

    beta = model.logit_scale
    bank_images, kept, _ = model.encode_images(bank.images, batch_size, num_workers, progress, memo)
    if not kept:
        raise EvalError(f"no readable image in the query bank (e.g. {bank.images[0] if bank.images else '-'})")
    bank_texts = model.encode_texts(bank.captions, progress=progress)
    ranks = retrieval_ranks(image_emb, text_emb, caption_to_image,
                            image_bias=querybank_bias(image_emb, bank_texts, beta),
                            text_bias=querybank_bias(text_emb, bank_images, beta))
    return {**metrics_from_ranks(*ranks), "beta": beta, "bank_images": len(kept), "bank_captions": len(bank.captions)}


def _rerank(model: EvalModel, image_emb: torch.Tensor, text_emb: torch.Tensor, caption_to_image: torch.Tensor,
            ranks: tuple[torch.Tensor, torch.Tensor], k: int, image_paths: list[str], captions: list[str],
            num_workers: int, progress: bool) -> dict[str, Any]:
    """The ITM re-ranking of the top `k` (evaluation.rerank), timed."""
    from .itm_score import ITMPairScorer, require_itm
    from .rerank import rerank_metrics

    start = time.perf_counter()
    scorer = ITMPairScorer(require_itm(model), model.preprocess, model.tokenize, image_paths, captions,
                           model.device, num_workers=num_workers, progress=progress)
    reranked = rerank_metrics(image_emb, text_emb, caption_to_image, k, scorer, ranks)
    return {"rerank_k": k, "rerank_seconds": time.perf_counter() - start,
            "reranked": {key: value for key, value in reranked.items() if key != "rerank_k"}}


def evaluate_retrieval(checkpoint: str | Path, karpathy: str | Path, images: str | Path, split: str = "test",
                       batch_size: int = 64, num_workers: int = 0, device: str | None = None,
                       progress: bool = True,
                       max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION, rerank: int = 0) -> dict[str, Any]:
    """Recall@K both ways of `checkpoint`, a unialign checkpoint or any model spec
    (`evaluation.models.load_eval_model`: ``hf:FOLDER``, ``openclip:ARCH``); unreadable images are
    dropped with their captions and counted (more than `max_missing_fraction` of them is an error).
    `rerank` K > 0: also the ITM re-ranking."""
    from .models import load_eval_model

    model = load_eval_model(checkpoint, device)
    data = read_karpathy_eval(karpathy, images, split)
    result = evaluate_retrieval_set(model, data, retrieval_dataset_name(karpathy), f"split {split!r} of {karpathy}",
                                    batch_size, num_workers, progress, max_missing_fraction, rerank)
    return {**result, "split": split, "checkpoint": str(checkpoint)}


def evaluate_retrieval_model(model: EvalModel, karpathy: str | Path | None = None,
                             manifest: str | Path | None = None, images: str | Path | None = None,
                             split: str = "test", dataset_name: str | None = None, batch_size: int = 64,
                             num_workers: int = 0, progress: bool = True,
                             max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION,
                             rerank: int = 0, memo: PixelMemo | None = None,
                             query_bank: str | Path | None = None) -> dict[str, Any]:
    """Retrieval on a Karpathy split or on a whole JSONL/CSV manifest (captions grouped by `image_id`).
    `rerank` K > 0: also re-rank each query's top K with the checkpoint's ITM head; `memo`: as
    `evaluate_retrieval_set`. `query_bank`: also the recalls with query-bank normalisation, the bank
    being other splits of the Karpathy file ("train" or "train,val") or another manifest (the training one).

    More than `max_missing_fraction` of the gallery's images missing or unreadable is an error.

    A manifest row without `image_id` is grouped by its image path, so several captions of
    one file form one gallery image.
    """
    if (karpathy is None) == (manifest is None):
        raise EvalError("give exactly one of karpathy (with images) or manifest")
    if karpathy is not None:
        if images is None:
            raise EvalError(f"--images (the root of {karpathy}'s filepath/filename) is required with --karpathy")
        data = read_karpathy_eval(karpathy, images, split)
        source, used_split, where = karpathy, split, f"split {split!r} of {karpathy}"
    else:
        assert manifest is not None
        rs = read_manifest(manifest, images)
        data, source, used_split = retrieval_set(rs.records, rs.skipped_empty), manifest, None
        where = str(manifest)
    bank = None if query_bank is None else _read_query_bank(str(query_bank), karpathy, manifest, images, split)
    result = evaluate_retrieval_set(model, data, dataset_name or retrieval_dataset_name(source), where, batch_size,
                                    num_workers, progress, max_missing_fraction, rerank, memo, bank)
    return {**result, "split": used_split, "source": str(source)}


def _read_query_bank(query_bank: str, karpathy: str | Path | None, manifest: str | Path | None,
                     images: str | Path | None, split: str) -> RetrievalSet:
    """The bank's images and captions: splits of the evaluated Karpathy file, or a manifest; never the gallery."""
    if karpathy is not None:
        splits = [part.strip() for part in query_bank.split(",") if part.strip()]
        if not splits or split in splits:
            raise EvalError(f"--query-bank {query_bank!r}: name the training splits of {karpathy} (e.g. train), "
                            f"not the evaluated split {split!r}")
        rs = read_karpathy(karpathy, images, splits)  # type: ignore[arg-type]  # images checked by the caller
    else:
        if Path(query_bank).resolve() == Path(manifest).resolve():  # type: ignore[arg-type]
            raise EvalError(f"--query-bank {query_bank} is the evaluated manifest; give the training manifest")
        rs = read_manifest(query_bank, images)
    if not rs.records:
        raise EvalError(f"--query-bank {query_bank!r}: no captioned images in it")
    return retrieval_set(rs.records, rs.skipped_empty)


