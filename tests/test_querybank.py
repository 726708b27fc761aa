"""Query-bank normalisation: the bias against an independent inverted softmax, a worked hub, evaluation wiring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unialign.evaluation.models import EvalModel
from unialign.evaluation.querybank import querybank_bias
from unialign.evaluation.retrieval import metrics_from_ranks, retrieval_ranks
from unialign.evaluation.run import evaluate_retrieval_model
from unialign.evaluation.specs import EvalError


def _problem(seed: int, n_images: int = 7, n_bank: int = 11, dim: int = 5):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    owner = torch.tensor([i % n_images for i in range(2 * n_images - 2)])
    texts = F.normalize(images[owner] + torch.randn(len(owner), dim, generator=gen), dim=-1)
    bank_images = F.normalize(torch.randn(n_bank, dim, generator=gen), dim=-1)
    bank_texts = F.normalize(torch.randn(n_bank + 3, dim, generator=gen), dim=-1)
    return images, texts, owner, bank_images, bank_texts


def _inverted_softmax_ranks(images, texts, owner, bank_images, bank_texts, beta):
    """Ranks by the inverted softmax probabilities, written out in float64 numpy, one query at a time."""
    s = images.double().numpy() @ texts.double().numpy().T  # images x captions
    image_norm = np.exp(beta * images.double().numpy() @ bank_texts.double().numpy().T).sum(axis=1)
    text_norm = np.exp(beta * bank_images.double().numpy() @ texts.double().numpy().T).sum(axis=0)
    p_image = np.exp(beta * s) / image_norm[:, None]  # P(image | caption), normalised over the bank's captions
    p_text = np.exp(beta * s) / text_norm[None, :]  # P(caption | image), normalised over the bank's images
    owner = owner.numpy()
    image_ranks = [sum(p_image[j, c] >= p_image[owner[c], c] for j in range(len(s)) if j != owner[c])
                   for c in range(s.shape[1])]
    text_ranks = []
    for i in range(len(s)):
        best = max(p_text[i, c] for c in range(s.shape[1]) if owner[c] == i)
        text_ranks.append(sum(p_text[i, c] >= best for c in range(s.shape[1]) if owner[c] != i))
    return text_ranks, image_ranks


@pytest.mark.parametrize("seed,beta", [(0, 14.0), (1, 5.0), (2, 30.0)])
def test_biased_ranks_are_the_inverted_softmax_ranks(seed: int, beta: float) -> None:
    images, texts, owner, bank_images, bank_texts = _problem(seed)
    text_ranks, image_ranks = retrieval_ranks(images, texts, owner, chunk_size=3,
                                              image_bias=querybank_bias(images, bank_texts, beta, chunk_size=2),
                                              text_bias=querybank_bias(texts, bank_images, beta, chunk_size=4))
    want_text, want_image = _inverted_softmax_ranks(images, texts, owner, bank_images, bank_texts, beta)
    assert text_ranks.tolist() == want_text
    assert image_ranks.tolist() == want_image
    plain = retrieval_ranks(images, texts, owner)
    assert (text_ranks.tolist(), image_ranks.tolist()) != (plain[0].tolist(), plain[1].tolist())


def test_bias_is_the_soft_mean_similarity() -> None:
    gallery, bank = F.normalize(torch.randn(4, 3), dim=-1), F.normalize(torch.randn(9, 3), dim=-1)
    s = (gallery @ bank.T).double().numpy()
    want = np.log(np.exp(10.0 * s).mean(axis=1)) / 10.0
    assert querybank_bias(gallery, bank, 10.0, chunk_size=2).double().numpy() == pytest.approx(want, abs=1e-6)
    # a bank of one query: the bias is that query's cosine
    assert querybank_bias(gallery, bank[:1], 3.0).numpy() == pytest.approx(s[:, 0], abs=1e-6)


def test_a_hub_image_gives_way() -> None:
    # Image 0 scores high with every caption (a hub): plain text->image ranking puts it first for the
    # captions of images 1 and 2 too. The bank's captions all like image 0 as well, so its bias is 0.75
    # (both bank scores 0.75) against (1/4) log((1 + e)/2) = 0.155 for images 1 and 2 (beta 4):
    #   caption 1: image 0 at 0.75 - 0.75 = 0, image 1 at 0.5 - 0.155 = 0.345 -> rank 0 (was 1)
    #   caption 2: the same -> rank 0 (was 1)
    #   caption 0: image 0 at 0.5 - 0.75 = -0.25, images 1 and 2 at 0 - 0.155 -> rank 2 (was 0)
    images = torch.eye(3)
    texts = torch.tensor([[0.5, 0.75, 0.75], [0.0, 0.5, 0.0], [0.0, 0.0, 0.5]]).T.contiguous()  # columns = images
    bank_texts = torch.tensor([[0.75, 0.0, 0.0], [0.75, 0.25, 0.25]])
    bias = querybank_bias(images, bank_texts, 4.0)
    assert bias.tolist() == pytest.approx([0.75, math.log((1 + math.e) / 2) / 4, math.log((1 + math.e) / 2) / 4])
    owner = torch.arange(3)
    assert retrieval_ranks(images, texts, owner)[1].tolist() == [0, 1, 1]
    assert retrieval_ranks(images, texts, owner, image_bias=bias)[1].tolist() == [2, 0, 0]
    plain = metrics_from_ranks(*retrieval_ranks(images, texts, owner), ks=(1,))
    normalised = metrics_from_ranks(*retrieval_ranks(images, texts, owner, image_bias=bias), ks=(1,))
    assert (plain["img_r1"], normalised["img_r1"]) == pytest.approx((100 / 3, 200 / 3))


def test_bad_bank_or_bias_is_refused() -> None:
    gallery = F.normalize(torch.randn(4, 3), dim=-1)
    with pytest.raises(ValueError, match="empty"):
        querybank_bias(gallery, torch.empty(0, 3), 10.0)
    with pytest.raises(ValueError, match="positive number"):
        querybank_bias(gallery, gallery, 0.0)
    with pytest.raises(ValueError, match=r"\(N, D\) and \(M, D\)"):
        querybank_bias(gallery, torch.randn(2, 5), 10.0)
    with pytest.raises(ValueError, match=r"image_bias must be finite, of shape \(4,\)"):
        retrieval_ranks(gallery, gallery, torch.arange(4), image_bias=torch.zeros(3))
    with pytest.raises(ValueError, match="text_bias"):
        retrieval_ranks(gallery, gallery, torch.arange(4), text_bias=torch.tensor([0.0, 1.0, float("nan"), 0.0]))


COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (120, 60, 10), (10, 120, 60), (60, 10, 120)]


class _TableModel(EvalModel):
    """Embeddings chosen by the test: an image's is a fixed map of its mean colour, a caption's a table row."""

    def __init__(self, captions: list[str]) -> None:
        gen = torch.Generator().manual_seed(3)
        self.map = torch.randn(3, 6, generator=gen)
        self.table = {c: F.normalize(torch.randn(6, generator=gen), dim=0) for c in captions}
        self.model = torch.nn.Module()
        self.model.logit_scale = torch.nn.Parameter(torch.tensor([math.log(9.0)]))
        self.name, self.width, self.device = "table", 6, torch.device("cpu")
        self.preprocess = _mean_colour

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(pixels @ self.map, dim=-1)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"rows": torch.stack([self.table[t] for t in texts])}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return tokens["rows"]


def _mean_colour(image) -> torch.Tensor:
    return torch.tensor(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)) / 255.0)


def _captions(i: int) -> list[str]:
    return [f"picture number {i}", f"another view {i}"]


@pytest.fixture(scope="module")
def karpathy_with_train(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("qb")
    images = []
    for i, rgb in enumerate(COLOURS):
        Image.new("RGB", (8, 8), rgb).save(root / f"{i}.png")
        images.append({"split": "test" if i < 5 else "train", "filepath": "", "filename": f"{i}.png",
                       "sentences": [{"raw": c} for c in _captions(i)]})
    path = root / "tiny_karpathy.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_evaluation_reports_both_rankings(karpathy_with_train: Path) -> None:
    model = _TableModel([c for i in range(len(COLOURS)) for c in _captions(i)])
    root = karpathy_with_train.parent
    result = evaluate_retrieval_model(model, karpathy_with_train, images=root, progress=False, query_bank="train")
    plain = evaluate_retrieval_model(model, karpathy_with_train, images=root, progress=False)
    assert "query_bank" not in plain and result["r_mean"] == plain["r_mean"]  # the plain recalls stay as they were
    bank = result["query_bank"]
    assert (bank["bank_images"], bank["bank_captions"], bank["beta"]) == (4, 8, pytest.approx(9.0))
    # independently: the inverted softmax of the same embeddings, the bank being the train split (images 5-8)
    def images(ids):
        return F.normalize(torch.stack([_mean_colour(np.full((2, 2, 3), COLOURS[i], np.uint8)) for i in ids])
                           @ model.map, dim=-1)

    def texts(ids):
        return torch.stack([model.table[c] for i in ids for c in _captions(i)])

    text_ranks, image_ranks = _inverted_softmax_ranks(images(range(5)), texts(range(5)),
                                                      torch.arange(5).repeat_interleave(2),
                                                      images(range(5, 9)), texts(range(5, 9)), 9.0)
    want = metrics_from_ranks(torch.tensor(text_ranks), torch.tensor(image_ranks))
    assert {k: bank[k] for k in want} == pytest.approx(want)
    assert want != metrics_from_ranks(*retrieval_ranks(images(range(5)), texts(range(5)),
                                                       torch.arange(5).repeat_interleave(2)))


def test_the_gallery_cannot_be_its_own_bank(karpathy_with_train: Path) -> None:
    model = _TableModel([c for i in range(len(COLOURS)) for c in _captions(i)])
    with pytest.raises(EvalError, match="not the evaluated split 'test'"):
        evaluate_retrieval_model(model, karpathy_with_train, images=karpathy_with_train.parent, progress=False,
                                 query_bank="train,test")
