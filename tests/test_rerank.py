"""ITM re-ranking: the rank arithmetic on a worked example, the chunked ITM scorer, `unialign eval
retrieval --rerank K` end to end, and `Searcher.search_text(rerank=)`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_cli import run
from test_eval_support import solid
from test_itm import itm_checkpoint  # noqa: F401  (the session fixture)
from test_search import build_tiny, make_images

from unialign.evaluation.itm_score import ITMPairScorer, itm_probabilities
from unialign.evaluation.rerank import rerank_metrics, rerank_ranks
from unialign.evaluation.retrieval import metrics_from_ranks, retrieval_ranks
from unialign.search.build import entries_from_folder

# --------------------------------------------------------------------------------------- worked example

# 4 images, 6 captions; caption c belongs to image OWNER[c]. Embeddings are unit vectors whose dot
# products are DUAL below (image rows, caption columns), by construction: images are the first
# four basis vectors of R^6 and caption c is sum_i DUAL[i, c] e_i + a filler in e_5 / e_6.
OWNER = torch.tensor([0, 0, 1, 2, 3, 3])
DUAL = torch.tensor([
    #  c0    c1    c2    c3    c4    c5
    [0.10, 0.20, 0.50, 0.40, 0.00, 0.05],  # image 0: dual order c2 c3 c1 c0 c5 c4 -> best positive c1 at rank 2
    [0.45, 0.00, 0.30, 0.40, 0.10, 0.20],  # image 1: c0 c3 c2 ... -> positive c2 at rank 2
    [0.10, 0.20, 0.25, 0.05, 0.40, 0.50],  # image 2: c5 c4 c2 c1 c0 c3 -> positive c3 at rank 5
    [0.00, 0.15, 0.35, 0.25, 0.30, 0.10],  # image 3: c2 c4 c3 c1 c5 c0 -> best positive c4 at rank 1
])


def _embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.eye(6)[:4]
    texts = torch.zeros(6, 6)
    texts[:, :4] = DUAL.T
    rest = (1 - (DUAL.T ** 2).sum(1)).sqrt()
    texts[:, 4] = rest  # unit norm; e_5 is orthogonal to every image
    return images, texts


# ITM "match probabilities" of every (image, caption) pair: the stub scorer's known scores
ITM = torch.tensor([
    [0.30, 0.90, 0.10, 0.20, 0.50, 0.60],
    [0.80, 0.00, 0.70, 0.10, 0.00, 0.00],
    [0.00, 0.00, 0.00, 0.99, 0.00, 0.00],
    [0.00, 0.00, 0.95, 0.40, 0.50, 0.10],
])


def stub_scorer(calls: list[torch.Tensor]):
    def score(pairs: torch.Tensor) -> torch.Tensor:
        calls.append(pairs.clone())
        return ITM[pairs[:, 0], pairs[:, 1]]
    return score


def test_rerank_worked_example():
    images, texts = _embeddings()
    torch.testing.assert_close(images @ texts.T, DUAL)
    dual_text, dual_image = retrieval_ranks(images, texts, OWNER)
    assert dual_text.tolist() == [2, 2, 5, 1]
    # text->image, dual: c0 (img0 .10; img1 .45, img2 .10 >= .10) -> 2; c1 (img0 .20; img2 .20, img3 .15) -> 1
    # c2 (img1 .30; img0 .50, img3 .35) -> 2; c3 (img2 .05; all others >= .05) -> 3
    # c4 (img3 .30; img2 .40) -> 1; c5 (img3 .10; img2 .50, img1 .20) -> 2
    assert dual_image.tolist() == [2, 1, 2, 3, 1, 2]

    calls: list[torch.Tensor] = []
    text_ranks, image_ranks = rerank_ranks(images, texts, OWNER, 3, stub_scorer(calls))
    # image->text, top 3 by dual and re-ordered by ITM:
    # image 0: {c2 .10, c3 .20, c1 .90} -> c1 first: rank 0
    # image 1: {c0 .80, c3 .10, c2 .70} -> c0 .80 > c2 .70: rank 1
    # image 2: {c5, c4, c2}, positive c3 not among them: dual rank 5 stays
    # image 3: {c2 .95, c4 .50, c3 .40} -> c2 .95 ahead of c4: rank 1
    assert text_ranks.tolist() == [0, 1, 5, 1]
    # text->image, top 3 images by dual per caption, re-ordered by ITM:
    # c0: {img1, img0, img2} (img0 and img2 tie at .10, both kept) -> ITM img1 .80 > img0 .30 -> 1
    # c1: {img0 .90, img2 .00, img3 .00} -> 0
    # c2: {img0 .10, img3 .95, img1 .70} -> img3 ahead: 1
    # c3: {img0 .20, img1 .10, img3 .40}: positive img2 not in top 3 -> dual 3
    # c4: {img2 .00, img3 .50, img1 .00} -> 0
    # c5: {img2 .00, img1 .00, img3 .10} -> 0
    assert image_ranks.tolist() == [1, 0, 1, 3, 0, 0]

    # every distinct pair scored once, in one call
    assert len(calls) == 1
    pairs = {tuple(p) for p in calls[0].tolist()}
    assert len(pairs) == calls[0].shape[0]

    metrics = rerank_metrics(images, texts, OWNER, 3, stub_scorer([]), ks=(1, 2))
    assert metrics["rerank_k"] == 3
    assert metrics["txt_r1"] == pytest.approx(100 * 1 / 4)  # image 0
    assert metrics["txt_r2"] == pytest.approx(100 * 3 / 4)  # images 0, 1, 3
    assert metrics["img_r1"] == pytest.approx(100 * 3 / 6)  # c1, c4, c5
    assert metrics["img_r2"] == pytest.approx(100 * 5 / 6)  # all but c3
    dual = metrics_from_ranks(dual_text, dual_image, ks=(1, 2))
    assert dual["txt_r1"] == 0.0 and dual["img_r2"] == pytest.approx(100 * 2 / 6)  # c1, c4


def test_rerank_with_k_beyond_the_gallery_and_a_constant_scorer():
    images, texts = _embeddings()
    # K larger than the gallery: every candidate is re-ranked, nothing keeps a dual rank
    text_ranks, image_ranks = rerank_ranks(images, texts, OWNER, 50, stub_scorer([]))
    for i in range(4):
        pos = ITM[i][OWNER == i].max()
        assert int(text_ranks[i]) == int(((ITM[i] >= pos) & (OWNER != i)).sum())
    # a constant scorer ties everything: pessimistic ranks = every other candidate ahead
    ranks = rerank_ranks(images, texts, OWNER, 2, lambda pairs: torch.zeros(pairs.shape[0]))
    dual = retrieval_ranks(images, texts, OWNER)
    for new, old in zip(ranks, dual):
        assert bool(((new == 1) | (new == old)).all()) and bool((new[old >= 2] == old[old >= 2]).all())
    with pytest.raises(ValueError, match="returned shape"):
        rerank_ranks(images, texts, OWNER, 2, lambda pairs: torch.zeros(1))


# --------------------------------------------------------------------------------------- ITM scorer


COLOURS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.0, 1.0, 1.0)]


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("karpathy_rerank")
    images = []
    for i, rgb in enumerate(COLOURS):
        Image.fromarray(solid(rgb)).save(root / f"{i}.png")
        images.append({"split": "test", "filepath": "", "filename": f"{i}.png",
                       "sentences": [{"raw": f"shape number {i}"}, {"raw": "a coloured square" + " big" * i}]})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    return path


def test_chunked_itm_scorer_equals_scoring_each_pair(itm_checkpoint, karpathy):  # noqa: F811
    from unialign.model.factory import load

    model, preprocess, tokenizer = load(itm_checkpoint)
    paths = [str(karpathy.parent / f"{i}.png") for i in range(len(COLOURS))]
    captions = ["a red one", "green", "the blue square in the middle of grey", "yellow", "x y z"]
    pairs = torch.tensor([[i, c] for i in range(5) for c in range(5) if (i + c) % 3 != 1])
    scorer = ITMPairScorer(model, preprocess, tokenizer, paths, captions, image_chunk=2, text_batch=2, pair_batch=3)
    got = scorer(pairs[torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(0))])
    expect = {}
    with torch.no_grad():
        for i, c in pairs.tolist():
            img = model.image_embeddings(preprocess(Image.open(paths[i]).convert("RGB"))[None]).tokens
            tok = tokenizer([captions[c]])
            txt = model.text_embeddings(tok["input_ids"], tok["attention_mask"])
            expect[(i, c)] = float(itm_probabilities(model, img, txt.tokens, txt.mask)[0])
    order = pairs[torch.randperm(pairs.shape[0], generator=torch.Generator().manual_seed(0))]
    for (i, c), value in zip(order.tolist(), got.tolist()):
        assert value == pytest.approx(expect[(i, c)], abs=1e-5)


# --------------------------------------------------------------------------------------- the CLI


def test_eval_retrieval_rerank_end_to_end(itm_checkpoint, karpathy, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "r.json"
    run(["eval", "retrieval", "--checkpoint", str(itm_checkpoint), "--karpathy", str(karpathy), "--images",
         str(karpathy.parent), "--output", str(out), "--no-progress", "--rerank", "3"])
    result = json.loads(out.read_text())
    assert result["rerank_k"] == 3
    assert result["encode_rank_seconds"] >= 0 and result["rerank_seconds"] >= 0
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r10", "r_mean"):
        assert 0 <= result[key] <= 100 and 0 <= result["reranked"][key] <= 100
    # beyond K nothing moves: recall@K and above are the dual encoder's
    assert result["reranked"]["txt_r5"] == result["txt_r5"] and result["reranked"]["img_r5"] == result["img_r5"]
    printed = capsys.readouterr().out
    assert "| dual encoder |" in printed and "| ITM re-rank top 3 |" in printed and "seconds" in printed

    # the same recalls without --rerank: the dual encoder's numbers do not depend on the option
    plain = tmp_path / "plain.json"
    run(["eval", "retrieval", "--checkpoint", str(itm_checkpoint), "--karpathy", str(karpathy), "--images",
         str(karpathy.parent), "--output", str(plain), "--no-progress"])
    plain_result = json.loads(plain.read_text())
    assert "reranked" not in plain_result and "rerank_seconds" not in plain_result
    for key in ("txt_r1", "img_r1", "rsum"):
        assert plain_result[key] == pytest.approx(result[key])


def test_rerank_without_itm_head_is_a_one_line_error(tiny_checkpoint, karpathy, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(["eval", "retrieval", "--checkpoint", str(tiny_checkpoint), "--karpathy", str(karpathy), "--images",
             str(karpathy.parent), "--output", str(tmp_path / "r.json"), "--no-progress", "--rerank", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ITM head" in err and "--rerank" in err
    assert not (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------------------- search


def test_search_text_rerank_reorders_hits(itm_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    from unialign.search import rerank as search_rerank
    from unialign.search.app import Limits, create_app
    from unialign.search.query import Searcher

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    images = make_images(tmp_path / "imgs", colours)
    build_tiny(itm_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    s = Searcher(tmp_path / "index", device="cpu")
    try:
        dual = s.search_text("a red square", k=6)
        assert s.search_text("a red square", k=6, rerank=0) == dual

        # a stub ITM: the probability is known per file (from the image's mean pixel), so the expected
        # order can be written down: the reverse of the colours' order in `prob`
        prob = {str(p.absolute()): 0.1 * (j + 1) for j, p in enumerate(images)}
        mean_of = {}
        with torch.no_grad():
            for p in images:
                tok = s.model.image_embeddings(s.preprocess(Image.open(p).convert("RGB"))[None]).tokens
                mean_of[round(float(tok.mean()), 4)] = prob[str(p.absolute())]

        def stub(model, image_tokens, text_tok, text_mask, batch_size=256):
            return torch.tensor([mean_of[round(float(t.mean()), 4)] for t in image_tokens])

        monkeypatch.setattr(search_rerank, "itm_probabilities", stub)
        hits = s.search_text("a red square", k=3, rerank=6)
        expected = sorted(dual, key=lambda h: -prob[h.path])[:3]
        assert [h.path for h in hits] == [h.path for h in expected]
        assert [h.rank for h in hits] == [1, 2, 3]
        assert [h.score for h in hits] == [h.score for h in expected]  # still the cosine similarity
        # rerank smaller than k: the top k are re-ordered
        hits = s.search_text("a red square", k=4, rerank=2)
        assert {h.path for h in hits} == {h.path for h in dual[:4]}
        assert [h.path for h in hits] == [h.path for h in sorted(dual[:4], key=lambda h: -prob[h.path])]

        from fastapi.testclient import TestClient

        client = TestClient(create_app(s, allowed_hosts=["testserver"]))
        body = client.get("/api/search", params={"q": "a red square", "k": 3, "rerank": 6}).json()
        assert [r["name"] for r in body["results"]] == [Path(h.path).name for h in expected]
        # the service reads hits again within its decode limits: here every file has more pixels than
        # they allow, so none can be scored and the dual encoder's order stands
        width, height = Image.open(images[0]).size
        strict = TestClient(create_app(s, Limits(max_decode_pixels=width * height - 1), allowed_hosts=["testserver"]))
        assert [h.path for h in expected] != [h.path for h in dual[:3]]  # (else the check below says nothing)
        body = strict.get("/api/search", params={"q": "a red square", "k": 3, "rerank": 6}).json()
        assert [r["name"] for r in body["results"]] == [Path(h.path).name for h in dual[:3]]
        plain = client.get("/api/search", params={"q": "a red square", "k": 3}).json()
        assert [r["name"] for r in plain["results"]] == [Path(h.path).name for h in dual[:3]]
        assert client.get("/api/search", params={"q": "red", "rerank": -1}).status_code == 422
    finally:
        s.close()


def test_search_rerank_needs_an_itm_head(tiny_checkpoint, tmp_path):
    from fastapi.testclient import TestClient

    from unialign.search.app import create_app
    from unialign.search.query import Searcher
    from unialign.search.store import SearchIndexError

    make_images(tmp_path / "imgs", ["red", "green"])
    build_tiny(tiny_checkpoint, tmp_path / "index", entries_from_folder(tmp_path / "imgs"))
    s = Searcher(tmp_path / "index", device="cpu")
    try:
        with pytest.raises(SearchIndexError, match="ITM head"):
            s.search_text("red", k=2, rerank=2)
        client = TestClient(create_app(s, allowed_hosts=["testserver"]))
        # the schema says so: without a head the largest allowed rerank is 0 (a documented 422 beyond)
        param = next(p for p in client.get("/openapi.json").json()["paths"]["/api/search"]["get"]["parameters"]
                     if p["name"] == "rerank")
        assert param["schema"]["maximum"] == 0
        assert client.get("/api/search", params={"q": "red", "rerank": 2}).status_code == 422
        assert client.get("/api/search", params={"q": "red", "rerank": 0}).status_code == 200
    finally:
        s.close()
