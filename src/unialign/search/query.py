"""Query side: embed a text or an image with the index's own model and look it up in FAISS."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from ..evaluation.run import default_device
from ..files import file_sha256
from ..model.factory import load
from . import ann
from .store import CAPTION_INDEX, IMAGE_INDEX, IndexStore, SearchIndexError

log = logging.getLogger(__name__)

# Caption hits are folded to one per image; fetching this many more than k keeps k distinct
# images in the result when an image has several matching captions.
CAPTION_OVERFETCH = 5


@dataclass(frozen=True)
class Hit:
    rank: int
    id: int  # items.id: the handle for thumbnails
    score: float  # cosine similarity; a text query on an index with a query bank: minus the image's bias
    path: str
    caption: str | None  # the matched caption (caption search) or the image's first caption

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _read_faiss(path: Path, what: str) -> faiss.Index:
    try:
        return ann.read(path)
    except RuntimeError as err:
        raise SearchIndexError(f"{path}: cannot read the {what} FAISS index ({str(err).splitlines()[0]}); "
                               f"run `unialign index build` on {path.parent} again to rebuild it") from None


class Searcher:
    """An opened index plus the model that made it: text->image, image->image, text->caption."""

    def __init__(self, index_dir: Path | str, checkpoint: Path | str | None = None, device: str | None = None,
                 nprobe: int | None = None, ef_search: int | None = None) -> None:
        self.store = IndexStore(index_dir, readonly=True)
        root = self.store.root
        meta = self.store.meta()
        if "checkpoint_sha256" not in meta:
            raise SearchIndexError(f"{root}: the first build never got past its start; run `unialign index build`")
        ckpt = Path(checkpoint or meta["checkpoint_path"])
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} of index {root} does not exist; pass --checkpoint with the "
                                    f"file's new location")
        if file_sha256(ckpt) != meta["checkpoint_sha256"]:
            raise SearchIndexError(f"checkpoint {ckpt} is not the model index {root} was built with (sha256 "
                                   f"{meta['checkpoint_sha256'][:16]}... expected): its embeddings would not match")
        if not (root / IMAGE_INDEX).is_file():
            raise SearchIndexError(f"{root} has no {IMAGE_INDEX} yet (was the build interrupted?); run "
                                   f"`unialign index build` on it again to finish")
        self.image_index = _read_faiss(root / IMAGE_INDEX, "image")
        self.caption_index = (_read_faiss(root / CAPTION_INDEX, "caption") if (root / CAPTION_INDEX).is_file()
                              else None)
        self.image_params = ann.params_of(self.image_index, nprobe, ef_search)
        ann.configure(self.image_index, self.image_params)
        self.caption_params = None
        if self.caption_index is not None:
            self.caption_params = ann.params_of(self.caption_index, nprobe, ef_search)
            ann.configure(self.caption_index, self.caption_params)
        counts = self.store.counts()
        if counts["items"] > self.image_index.ntotal:
            log.warning("%s: %d image(s) are committed but not in %s yet (interrupted build?); run "
                        "`unialign index build` again to make them searchable", root,
                        counts["items"] - self.image_index.ntotal, IMAGE_INDEX)
        self.device = device or default_device()
        self.model, self.preprocess, self.tokenizer = load(ckpt, device=self.device)
        self.checkpoint_sha256 = meta["checkpoint_sha256"]
        # a query bank adds a column to images.faiss: minus each image's bias (search.build._part)
        self.query_bank = int(meta["query_bank_size"]) if "query_bank_sha256" in meta else 0
        if (self.image_index.d != self.model.width + bool(self.query_bank)
                or meta.get("images_faiss_query_bank", "") != meta.get("query_bank_sha256", "")):
            raise SearchIndexError(f"{root / IMAGE_INDEX} was not built for the index's query bank (interrupted "
                                   f"build?); run `unialign index build` on {root} again to rebuild it")

    def close(self) -> None:
        self.store.close()

    @property
    def size(self) -> int:
        return int(self.image_index.ntotal)

    @torch.inference_mode()
    def embed_text(self, text: str) -> np.ndarray:
        tokens = {k: v.to(self.device) for k, v in self.tokenizer([text]).items()}
        return self.model.encode_text(tokens).float().cpu().numpy()

    @torch.inference_mode()
    def embed_image(self, image: Image.Image) -> np.ndarray:
        pixels = self.preprocess(image).unsqueeze(0).to(self.device)
        return self.model.encode_image(pixels).float().cpu().numpy()

    def search_text(self, text: str, k: int = 10, rerank: int = 0,
                    read_image: Callable[[str], Image.Image] | None = None) -> list[Hit]:
        """Images whose embedding is closest to the text's.

        `rerank` > 0 (a model with an ITM head): the top max(k, rerank) hits are re-ordered by the
        ITM head's match probability of (text, image), read again from the indexed files (by `read_image`,
        default `load_image`), and the first k returned; `score` stays the cosine similarity. 0: the
        dual encoder's order."""
        if rerank < 0:
            raise ValueError(f"rerank must be >= 0, got {rerank}")
        if not rerank:
            return self._image_hits(self.embed_text(text), k, bias=True)
        if self.model.itm_head is None:
            raise SearchIndexError("rerank needs a checkpoint with an ITM head (trained with model.itm: true); "
                                   "this index's model has none")
        from .rerank import rerank_hits

        hits = self._image_hits(self.embed_text(text), max(k, rerank), bias=True)
        return rerank_hits(self.model, self.preprocess, self.tokenizer, text, hits, self.device, read_image)[:k]

    def search_image(self, image: Image.Image, k: int = 10) -> list[Hit]:
        """Indexed images most similar to ``image`` (RGB, as `load_image` returns it)."""
        return self._image_hits(self.embed_image(image), k)

    def search_captions(self, text: str, k: int = 10) -> list[Hit]:
        """Images whose captions are closest to the text (best caption per image)."""
        if self.caption_index is None:
            raise SearchIndexError(f"{self.store.root} holds no captions (build it from a --manifest with captions "
                                   f"to search them)")
        scores, ids = ann.search(self.caption_index, self.embed_text(text), k * CAPTION_OVERFETCH)
        found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        captions = self.store.captions([i for _, i in found])
        best: dict[int, tuple[float, str]] = {}
        for score, cid in found:
            item_id, caption = captions[cid]
            if item_id not in best:
                best[item_id] = (score, caption)
        chosen = list(best.items())[:k]
        items = self.store.items([i for i, _ in chosen])
        return [Hit(rank, item_id, score, items[item_id].path, caption)
                for rank, (item_id, (score, caption)) in enumerate(chosen, 1)]

    def _image_hits(self, query: np.ndarray, k: int, bias: bool = False) -> list[Hit]:
        """`bias`: a text query, which an index with a query bank scores against the images' biases."""
        if self.query_bank:
            query = np.concatenate([query, np.full((len(query), 1), float(bias), dtype=query.dtype)], axis=1)
        scores, ids = ann.search(self.image_index, query, k)
        found = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        items = self.store.items([i for _, i in found])
        return [Hit(rank, i, score, items[i].path, items[i].caption) for rank, (score, i) in enumerate(found, 1)]

    def path_of(self, item_id: int) -> str | None:
        """The indexed file of ``item_id``; the only way the server turns a request into a path."""
        item = self.store.items([item_id]).get(item_id)
        return item.path if item else None
