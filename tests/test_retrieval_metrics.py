"""Exact retrieval recall: hand-worked cases, tie rule, chunk invariance, validation, CLIP_benchmark agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from unialign.evaluation import recall_at_k, retrieval_metrics, retrieval_ranks


def _from_scores(scores: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings whose dot products are exactly ``scores`` (images x captions).

    One-hot image embeddings make ``image_emb @ text_emb.T == text_emb.T``, so the
    score matrix can be written out by hand; dyadic values keep every score exact.
    """
    sim = torch.tensor(scores, dtype=torch.float32)
    return torch.eye(sim.shape[0]), sim.T.contiguous()


def _random_problem(seed: int, n_images: int, dim: int, captions_per_image: list[int] | None = None):
    """Normalised random embeddings with a shuffled caption order and uneven caption counts."""
    gen = torch.Generator().manual_seed(seed)
    if captions_per_image is None:
        captions_per_image = torch.randint(1, 7, (n_images,), generator=gen).tolist()
    owner = torch.repeat_interleave(torch.arange(n_images), torch.tensor(captions_per_image))
    owner = owner[torch.randperm(owner.numel(), generator=gen)]
    images = F.normalize(torch.randn(n_images, dim, generator=gen), dim=-1)
    # Captions near their image so recalls are neither 0 nor 100%.
    texts = F.normalize(images[owner] + 1.2 * torch.randn(owner.numel(), dim, generator=gen), dim=-1)
    return images, texts, owner


def _assert_no_ties(images: torch.Tensor, texts: torch.Tensor) -> None:
    """Without exact ties every tie convention (and topk order) gives the same ranks."""
    sim = images @ texts.T
    for row in (*sim, *sim.T):
        assert torch.unique(row).numel() == row.numel()


# Hand-worked example: 3 images, 5 captions, caption_to_image = [0, 0, 1, 2, 2].
#            c0     c1     c2     c3     c4
#   i0     0.5    0.25   0.75   0.0    0.125
#   i1     0.75   0.5    0.625  0.875  0.375
#   i2     0.25   0.375  0.25   0.375  0.5
HAND_SCORES = [
    [0.5, 0.25, 0.75, 0.0, 0.125],
    [0.75, 0.5, 0.625, 0.875, 0.375],
    [0.25, 0.375, 0.25, 0.375, 0.5],
]
HAND_OWNER = torch.tensor([0, 0, 1, 2, 2])


def test_hand_worked_ranks_and_recalls() -> None:
    images, texts = _from_scores(HAND_SCORES)
    text_ranks, image_ranks = retrieval_ranks(images, texts, HAND_OWNER)
    # Image->text (rows), rank of the best positive = #negatives scoring >= it:
    #   i0: best positive c0=0.5; negatives c2=0.75, c3=0.0, c4=0.125 -> 1 (c2)
    #   i1: positive c2=0.625; negatives 0.75, 0.5, 0.875, 0.375      -> 2 (c0, c3)
    #   i2: best positive c4=0.5; negatives 0.25, 0.375, 0.25         -> 0
    assert text_ranks.tolist() == [1, 2, 0]
    # Text->image (columns), #other images scoring >= the caption's own image:
    #   c0: own i0=0.5,   others 0.75, 0.25  -> 1
    #   c1: own i0=0.25,  others 0.5, 0.375  -> 2
    #   c2: own i1=0.625, others 0.75, 0.25  -> 1
    #   c3: own i2=0.375, others 0.0, 0.875  -> 1
    #   c4: own i2=0.5,   others 0.125, 0.375 -> 0
    assert image_ranks.tolist() == [1, 2, 1, 1, 0]
    assert text_ranks.dtype == image_ranks.dtype == torch.long

    m = retrieval_metrics(images, texts, HAND_OWNER, ks=(1, 2, 3))
    # TR@1 = 1/3 (i2), TR@2 = 2/3 (i0, i2), TR@3 = 3/3.
    assert m["txt_r1"] == pytest.approx(100 / 3)
    assert m["txt_r2"] == pytest.approx(200 / 3)
    assert m["txt_r3"] == pytest.approx(100.0)
    # IR@1 = 1/5 (c4), IR@2 = 4/5 (all but c1), IR@3 = 5/5.
    assert m["img_r1"] == pytest.approx(20.0)
    assert m["img_r2"] == pytest.approx(80.0)
    assert m["img_r3"] == pytest.approx(100.0)
    # rsum = 33.33 + 66.67 + 100 + 20 + 80 + 100 = 400; r_mean = 400 / 6.
    assert m["rsum"] == pytest.approx(400.0)
    assert m["r_mean"] == pytest.approx(400 / 6)
    assert m["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert m["image_retrieval_recall@2"] == pytest.approx(0.8)


def test_default_keys() -> None:
    images, texts = _from_scores(HAND_SCORES)
    m = retrieval_metrics(images, texts, HAND_OWNER)
    expected = {f"{side}_r{k}" for side in ("txt", "img") for k in (1, 5, 10)}
    expected |= {f"{kind}_retrieval_recall@{k}" for kind in ("text", "image") for k in (1, 5, 10)}
    expected |= {"r_mean", "rsum"}
    assert set(m) == expected
    assert all(isinstance(v, float) for v in m.values())
    # With 3 images and 5 captions every positive is within the top 5.
    assert m["txt_r5"] == m["img_r10"] == 100.0
    assert m["text_retrieval_recall@1"] * 100 == pytest.approx(m["txt_r1"])


def test_ties_count_against_the_model() -> None:
    # caption_to_image = [0, 0, 1]
    #            c0     c1     c2
    #   i0     0.5    0.25   0.5
    #   i1     0.5    0.5    0.5
    images, texts = _from_scores([[0.5, 0.25, 0.5], [0.5, 0.5, 0.5]])
    text_ranks, image_ranks = retrieval_ranks(images, texts, torch.tensor([0, 0, 1]))
    # i0: best positive c0=0.5 ties negative c2=0.5 -> rank 1 (a "strictly greater" rule would give 0).
    # i1: positive c2=0.5 ties both negatives       -> rank 2.
    assert text_ranks.tolist() == [1, 2]
    # c0: own 0.5 ties i1 -> 1; c1: own 0.25 < i1 0.5 -> 1; c2: own 0.5 ties i0 -> 1.
    assert image_ranks.tolist() == [1, 1, 1]


def test_ties_between_positives_do_not_hurt() -> None:
    # Two captions of i0 tie at the top: the best positive has no negative above it -> rank 0.
    images, texts = _from_scores([[0.5, 0.5, 0.25], [0.25, 0.25, 0.5]])
    text_ranks, _ = retrieval_ranks(images, texts, torch.tensor([0, 0, 1]))
    assert text_ranks.tolist() == [0, 0]


def test_collapsed_embeddings_score_zero() -> None:
    # Every score equal: a collapsed model must not be rewarded with perfect recall.
    images, texts = torch.zeros(4, 8), torch.zeros(12, 8)
    m = retrieval_metrics(images, texts, torch.arange(12) % 4, ks=(1,))
    assert m["txt_r1"] == 0.0
    assert m["img_r1"] == 0.0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunking_is_exact(chunk_size: int) -> None:
    images, texts, owner = _random_problem(seed=0, n_images=37, dim=16)
    reference = retrieval_ranks(images, texts, owner, chunk_size=10_000)
    chunked = retrieval_ranks(images, texts, owner, chunk_size=chunk_size)
    assert torch.equal(chunked[0], reference[0])
    assert torch.equal(chunked[1], reference[1])
    assert retrieval_metrics(images, texts, owner, chunk_size=chunk_size) == retrieval_metrics(
        images, texts, owner, chunk_size=10_000
    )


def test_ranks_match_sorting_reference() -> None:
    """Independent check against ranks read off a full descending sort (data without ties)."""
    images, texts, owner = _random_problem(seed=1, n_images=25, dim=8)
    _assert_no_ties(images, texts)
    sim = images @ texts.T
    expected_text = [
        next(pos for pos, c in enumerate(torch.argsort(sim[i], descending=True).tolist()) if owner[c] == i)
        for i in range(sim.shape[0])
    ]
    expected_image = [
        torch.argsort(sim[:, c], descending=True).tolist().index(int(owner[c])) for c in range(sim.shape[1])
    ]
    text_ranks, image_ranks = retrieval_ranks(images, texts, owner, chunk_size=4)
    assert text_ranks.tolist() == expected_text
    assert image_ranks.tolist() == expected_image
    assert 0.0 < recall_at_k(text_ranks, 1) < 1.0
    assert 0.0 < recall_at_k(image_ranks, 1) < 1.0


class _MatmulShapes(TorchFunctionMode):
    """Records the output shape of every matrix product."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.Tensor.__matmul__, torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm):
            self.shapes.append(tuple(out.shape))
        return out


def test_score_matrix_is_never_materialised_whole() -> None:
    images, texts, owner = _random_problem(seed=2, n_images=20, dim=8)
    with _MatmulShapes() as mode:
        retrieval_ranks(images, texts, owner, chunk_size=6)
    assert mode.shapes
    assert all(rows <= 6 and cols <= 6 for rows, cols in mode.shapes)


def test_low_precision_and_int32_owner() -> None:
    images, texts, owner = _random_problem(seed=3, n_images=10, dim=8)
    half = retrieval_ranks(images.bfloat16(), texts.bfloat16(), owner.int(), chunk_size=4)
    full = retrieval_ranks(images.bfloat16().float(), texts.bfloat16().float(), owner)
    assert torch.equal(half[0], full[0]) and torch.equal(half[1], full[1])


def test_recall_at_k() -> None:
    ranks = torch.tensor([0, 1, 4, 9, 10])
    assert recall_at_k(ranks, 1) == 0.2
    assert recall_at_k(ranks, 5) == 0.6
    assert recall_at_k(ranks, 10) == 0.8
    with pytest.raises(ValueError, match="k must be a positive int"):
        recall_at_k(ranks, 0)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        recall_at_k(torch.zeros(0, dtype=torch.long), 1)


@pytest.mark.parametrize(
    ("images", "texts", "owner", "error", "match"),
    [
        (torch.randn(3, 4), torch.randn(5, 6), torch.tensor([0, 0, 1, 2, 2]), ValueError, "embedding dims differ"),
        (torch.randn(3, 4, 1), torch.randn(5, 4), torch.tensor([0, 0, 1, 2, 2]), ValueError, "must be 2-D"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), ValueError, r"shape \(5,\)"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 0, 1, 2, 3]), ValueError, r"\[0, 2\]"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([-1, 0, 1, 2, 2]), ValueError, r"\[0, 2\]"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 0, 0, 2, 2]), ValueError, "image 1 has no caption"),
        (torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0.0, 0, 1, 2, 2]), TypeError, "integer tensor"),
        (torch.randn(3, 4), torch.randint(0, 2, (5, 4)), torch.tensor([0, 0, 1, 2, 2]), TypeError, "floating point"),
        (torch.randn(0, 4), torch.randn(0, 4), torch.zeros(0, dtype=torch.long), ValueError, "at least one"),
        (
            torch.tensor([[float("nan"), 0.0]] * 3),
            torch.randn(5, 2),
            torch.tensor([0, 0, 1, 2, 2]),
            ValueError,
            "NaN or Inf",
        ),
    ],
)
def test_input_validation(images, texts, owner, error, match) -> None:
    with pytest.raises(error, match=match):
        retrieval_metrics(images, texts, owner)


def test_argument_validation() -> None:
    images, texts = _from_scores(HAND_SCORES)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_ranks(images, texts, HAND_OWNER, chunk_size=0)
    with pytest.raises(ValueError, match="every k"):
        retrieval_metrics(images, texts, HAND_OWNER, ks=(1, 0))
    with pytest.raises(ValueError, match="at least one k"):
        retrieval_metrics(images, texts, HAND_OWNER, ks=())


def test_agrees_with_clip_benchmark() -> None:
    """Run CLIP_benchmark's own ``evaluate`` pipeline on identity "encoders" over our embeddings."""
    zeroshot_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    n_images, per_image, batch_size = 60, 5, 16
    images, texts, owner = _random_problem(seed=4, n_images=n_images, dim=32, captions_per_image=[per_image] * n_images)
    _assert_no_ties(images, texts)

    # Their dataset yields (image, list of captions); a caption "string" is its row in `texts`.
    captions_of = [[str(c) for c in torch.nonzero(owner == i).flatten().tolist()] for i in range(n_images)]
    dataloader = [
        (images[start : start + batch_size], captions_of[start : start + batch_size])
        for start in range(0, n_images, batch_size)
    ]

    class IdentityModel:
        def encode_image(self, x: torch.Tensor) -> torch.Tensor:
            return x

        def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
            return texts[ids]

    def tokenizer(captions: list[str]) -> torch.Tensor:
        return torch.tensor([int(c) for c in captions])

    theirs = zeroshot_retrieval.evaluate(
        IdentityModel(), dataloader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10]
    )
    ours = retrieval_metrics(images, texts, owner, ks=(1, 5, 10), chunk_size=7)
    assert set(theirs) <= set(ours)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    # Guard against a vacuous agreement where everything is 0 or 1.
    assert 0.0 < ours["image_retrieval_recall@1"] < 1.0
    assert 0.0 < ours["text_retrieval_recall@1"] < 1.0
