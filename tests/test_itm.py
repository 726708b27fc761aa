"""ITM head (model/itm.py), hard-negative ITM loss (losses/itm.py), and model.itm in checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from unialign.losses.itm import ITMLoss, hard_negative_weights, itm_loss, sample_hard_negatives
from unialign.model.itm import ITMHead, match_probability


def _head(dim: int = 32, heads: int = 4) -> ITMHead:
    torch.manual_seed(0)
    return ITMHead(dim, heads)


# --------------------------------------------------------------------------------------- the head


def test_head_shapes_and_gradient_flow():
    head = _head()
    image = torch.randn(3, 5, 32, requires_grad=True)
    text = torch.randn(3, 7, 32, requires_grad=True)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    logits = head(image, text, mask)
    assert logits.shape == (3, 2)
    probs = match_probability(logits)
    assert probs.shape == (3,) and bool(((probs > 0) & (probs < 1)).all())
    logits[:, 1].sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert text.grad is not None and text.grad[:, 0].abs().sum() > 0
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padding_is_not_attended():
    head = _head().eval()
    image = torch.randn(2, 5, 32)
    text = torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    before = head(image, text, mask)
    changed = text.clone()
    changed[0, 3:] = 100 * torch.randn(3, 32)  # only the padding of caption 0
    after = head(image, changed, mask)
    torch.testing.assert_close(after, before)
    changed[0, 1] = torch.randn(32)  # a real token does matter
    assert not torch.allclose(head(image, changed, mask)[0], before[0])
    # and the image does matter (cross-attention)
    assert not torch.allclose(head(image.flip(0), text, mask), before)


def test_head_refuses_mismatched_batches():
    with pytest.raises(ValueError, match="one image per caption"):
        _head()(torch.randn(2, 5, 32), torch.randn(3, 4, 32), None)


# --------------------------------------------------------------------------------------- sampling


def _sims(b: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    emb_i = torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=-1)
    emb_t = torch.nn.functional.normalize(torch.randn(b, 8, generator=g), dim=-1)
    return emb_i @ emb_t.T


def test_sampler_never_draws_the_same_image():
    ids = torch.tensor([7, 7, 3, 3, 3, 9, 1])
    sim = _sims(7)
    sim += 5 * (ids[:, None] == ids[None, :])  # same-image pairs the most similar: the tempting ones
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        neg_t, neg_i = sample_hard_negatives(sim, ids, scale=10.0, generator=gen)
        assert bool((ids[neg_t] != ids).all()) and bool((ids[neg_i] != ids).all())


def test_sampler_follows_the_softmax_of_similarities():
    ids = torch.tensor([0, 1, 1, 2, 3])
    sim = _sims(5, seed=2)
    scale = 4.0
    # independent: softmax over the other images' items, by hand in numpy
    s = sim.double().numpy() * scale
    same = (ids[:, None] == ids[None, :]).numpy()
    expect_i2t = np.where(same, 0.0, np.exp(s))
    expect_i2t /= expect_i2t.sum(1, keepdims=True)
    expect_t2i = np.where(same, 0.0, np.exp(s.T))
    expect_t2i /= expect_t2i.sum(1, keepdims=True)
    w_i2t, w_t2i = hard_negative_weights(sim, ids, scale)
    np.testing.assert_allclose(w_i2t.numpy(), expect_i2t, atol=1e-6)
    np.testing.assert_allclose(w_t2i.numpy(), expect_t2i, atol=1e-6)

    # many draws in few calls: `copies` independent batches side by side, other batches far away
    # similarity (weight 0), so every row draws from its own batch's distribution
    copies, calls = 50, 80
    n = copies * calls
    own_block = torch.kron(torch.eye(copies), torch.ones(5, 5)).bool()
    big_sim = sim.repeat(copies, copies).masked_fill(~own_block, -1e4)  # exp(-4e4) = 0
    big_ids = (ids[None, :] + 10 * torch.arange(copies)[:, None]).flatten()
    gen = torch.Generator().manual_seed(0)
    counts_t = np.zeros((5, 5))
    counts_i = np.zeros((5, 5))
    rows = np.tile(np.arange(5), copies)
    for _ in range(calls):
        neg_t, neg_i = sample_hard_negatives(big_sim, big_ids, scale, generator=gen)
        assert bool((neg_t // 5 == torch.arange(5 * copies) // 5).all())
        np.add.at(counts_t, (rows, neg_t.numpy() % 5), 1)
        np.add.at(counts_i, (rows, neg_i.numpy() % 5), 1)
    tol = 5 * np.sqrt(0.25 / n)  # five standard errors at the worst p
    np.testing.assert_allclose(counts_t / n, expect_i2t, atol=tol)
    np.testing.assert_allclose(counts_i / n, expect_t2i, atol=tol)


def test_sampler_is_reproducible_under_the_global_seed():
    ids = torch.arange(6)
    sim = _sims(6)
    torch.manual_seed(5)
    first = sample_hard_negatives(sim, ids, 10.0)
    torch.manual_seed(5)
    second = sample_hard_negatives(sim, ids, 10.0)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_no_negative_when_every_item_shows_the_same_image():
    ids = torch.tensor([4, 4, 4])
    neg_t, neg_i = sample_hard_negatives(_sims(3), ids, 10.0)
    assert neg_t.tolist() == [-1, -1, -1] and neg_i.tolist() == [-1, -1, -1]
    head = _head()
    out = itm_loss(head, torch.randn(3, 5, 32), torch.randn(3, 4, 32), None, _sims(3), ids, 10.0)
    assert out.labels.tolist() == [1, 1, 1] and torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------- the loss


class MeanHead(nn.Module):
    """A stub ITM head whose logits are easy to compute independently: a linear map of
    [mean image token, masked mean text token]."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.linear = nn.Linear(2 * dim, 2)

    def forward(self, image_tokens, text_tokens, text_mask):
        w = text_mask.float()[..., None]
        text = (text_tokens * w).sum(1) / w.sum(1)
        return self.linear(torch.cat([image_tokens.mean(1), text], dim=-1))


def test_itm_loss_matches_an_independent_computation():
    b, dim = 6, 8
    torch.manual_seed(0)
    image = torch.randn(b, 3, dim)
    text = torch.randn(b, 5, dim)
    mask = torch.ones(b, 5, dtype=torch.long)
    mask[2, 3:] = 0
    mask[4, 1:] = 0
    ids = torch.tensor([0, 0, 1, 2, 3, 3])
    sim = _sims(b)
    head = MeanHead(dim)
    out = itm_loss(head, image, text, mask, sim, ids, scale=7.0, generator=torch.Generator().manual_seed(11))
    neg_t, neg_i = sample_hard_negatives(sim, ids, 7.0, generator=torch.Generator().manual_seed(11))

    def logit(i: int, t: int) -> np.ndarray:
        m = mask[t].float()
        text_mean = (text[t] * m[:, None]).sum(0) / m.sum()
        feats = torch.cat([image[i].mean(0), text_mean]).double().numpy()
        return head.linear.weight.detach().double().numpy() @ feats + head.linear.bias.detach().double().numpy()

    pairs = [(i, i, 1) for i in range(b)] + [(i, int(neg_t[i]), 0) for i in range(b)] \
        + [(int(neg_i[t]), t, 0) for t in range(b)]
    losses = []
    for i, t, label in pairs:
        z = logit(i, t)
        losses.append(-(z[label] - math.log(np.exp(z).sum())))
    assert out.labels.tolist() == [p[2] for p in pairs]
    assert out.logits.shape == (3 * b, 2)
    assert out.loss.item() == pytest.approx(float(np.mean(losses)), rel=1e-5)
    for row, (i, t, _) in enumerate(pairs):
        np.testing.assert_allclose(out.logits[row].detach().double().numpy(), logit(i, t), rtol=1e-5, atol=1e-6)


def test_itm_loss_trains_the_head_and_the_tokens_and_module_form_is_seeded():
    b = 4
    head = _head()
    image = torch.randn(b, 5, 32, requires_grad=True)
    text = torch.randn(b, 6, 32, requires_grad=True)
    ids = torch.arange(b)
    sim = _sims(b)
    out = ITMLoss(seed=0)(head, image, text, None, sim, ids, torch.tensor([14.3]))
    out.loss.backward()
    assert image.grad.abs().sum() > 0 and text.grad.abs().sum() > 0
    assert head.classifier.weight.grad.abs().sum() > 0
    again = ITMLoss(seed=0)(head, image, text, None, sim, ids, torch.tensor([14.3]))
    torch.testing.assert_close(again.loss, out.loss)


def test_head_learns_which_caption_matches_which_image():
    """Trained with the hard-negative loss on token sets whose pairing is learnable (each of 8
    classes has its own image and text token pattern, unrelated across modalities), the head ranks
    a caption's own image above the other classes' images: a head that cannot learn, or a
    match / no-match index swapped between the loss and `match_probability`, fails this."""
    g = torch.Generator().manual_seed(0)
    classes, dim, n_img, n_txt = 8, 32, 5, 6
    proto_img, proto_txt = torch.randn(classes, 1, dim, generator=g), torch.randn(classes, 1, dim, generator=g)

    def pairs(cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.5
        return (proto_img[cls] + noise * torch.randn(len(cls), n_img, dim, generator=g),
                proto_txt[cls] + noise * torch.randn(len(cls), n_txt, dim, generator=g))

    head = _head(dim)
    loss_fn = ITMLoss(seed=0)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    for _ in range(150):
        cls = torch.randperm(classes, generator=g)
        image, text = pairs(cls)
        loss = loss_fn(head, image, text, None, _sims(classes), cls, torch.tensor(10.0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    with torch.no_grad():
        image, text = pairs(torch.arange(classes))
        # every caption against every image: (caption c, image i) at [c, i]
        scores = match_probability(head(image.repeat(classes, 1, 1),
                                        text.repeat_interleave(classes, dim=0))).view(classes, classes)
    assert (scores.argmax(dim=1) == torch.arange(classes)).float().mean() >= 0.75, scores
    assert scores.diagonal().mean() > 0.5 > scores[~torch.eye(classes, dtype=torch.bool)].mean()


# --------------------------------------------------------------------------------------- the model


def itm_spec(text_model_dir: Path, teacher_checkpoint: Path, itm: bool = True):
    from conftest import tiny_config_dict

    from unialign.config import InferenceConfig, ModelConfig, Preprocess

    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [])
    return InferenceConfig(model=ModelConfig.model_validate({**raw["model"], "itm": itm}), kd_dim=64,
                           preprocess=Preprocess(image_size=raw["data"]["image_size"]))


@pytest.fixture(scope="session")
def itm_checkpoint(tmp_path_factory: pytest.TempPathFactory, text_model_dir: Path, teacher_checkpoint: Path) -> Path:
    """An untrained tiny model with an ITM head, exported as an inference checkpoint."""
    from transformers import AutoTokenizer

    from unialign.model.factory import create_student, export_checkpoint

    spec = itm_spec(text_model_dir, teacher_checkpoint)
    torch.manual_seed(0)
    model = create_student(spec)
    return export_checkpoint(model, spec, AutoTokenizer.from_pretrained(text_model_dir),
                             tmp_path_factory.mktemp("itm_ckpt") / "itm.ckpt")


def test_default_model_has_no_itm_head(text_model_dir, teacher_checkpoint):
    from unialign.config import ModelConfig
    from unialign.model.factory import create_student

    assert ModelConfig().itm is False
    torch.manual_seed(0)
    plain = create_student(itm_spec(text_model_dir, teacher_checkpoint, itm=False))
    torch.manual_seed(0)
    with_itm = create_student(itm_spec(text_model_dir, teacher_checkpoint, itm=True))
    assert plain.itm_head is None
    keys = set(plain.state_dict())
    assert not any(k.startswith("itm_head") for k in keys)
    assert keys == {k for k in with_itm.state_dict() if not k.startswith("itm_head.")}
    with pytest.raises(ValueError, match="no ITM head"):
        plain.itm_logits(torch.randn(1, 2, plain.width), torch.randn(1, 2, plain.width), None)


def test_itm_checkpoint_round_trips(itm_checkpoint):
    from unialign.model.factory import load, read_checkpoint, student_state_dict

    model, preprocess, tokenizer = load(itm_checkpoint)
    assert model.itm_head is not None
    saved = student_state_dict(read_checkpoint(itm_checkpoint))
    assert any(k.startswith("itm_head.") for k in saved)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    pixels = torch.randn(2, 3, 32, 32)
    tokens = tokenizer(["a red square", "two blue circles on grey"])
    with torch.no_grad():
        img = model.image_embeddings(pixels)
        txt = model.text_embeddings(tokens["input_ids"], tokens["attention_mask"])
        logits = model.itm_logits(img.tokens, txt.tokens, txt.mask)
    assert img.tokens.shape[0] == 2 and img.tokens.shape[-1] == model.width and img.mask is None
    assert txt.tokens.shape[:2] == tokens["input_ids"].shape and torch.equal(txt.mask, tokens["attention_mask"].bool())
    torch.testing.assert_close(img.tokens[:, 0], img.embedding * img.tokens[:, 0].norm(dim=-1, keepdim=True))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    # a loss step through the real model reaches the head and the shared block
    model.train()
    img = model.image_embeddings(pixels)
    txt = model.text_embeddings(tokens["input_ids"], tokens["attention_mask"])
    out = itm_loss(model, img.tokens, txt.tokens, txt.mask, img.embedding @ txt.embedding.T,
                   torch.tensor([0, 1]), model.logit_scale.exp())
    out.loss.backward()
    assert model.itm_head.classifier.weight.grad.abs().sum() > 0
    assert model.shared[0].mlp.fc2.weight.grad.abs().sum() > 0


def test_training_objective_adds_the_itm_loss_only_with_the_head(text_model_dir, teacher_checkpoint):
    """DistillTask: with model.itm the sum gains itm_weight x the ITM loss (the same draws as
    `itm_loss` on the step's own tokens), and the head gets gradients; without it, no `itm` term."""
    from conftest import tiny_config_dict
    from unialign.config import Config
    from unialign.training.task import DistillTask

    def task(itm: bool, weight: float = 0.5) -> DistillTask:
        raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "karpathy", "path": "x.json", "images": "."}])
        raw["model"]["itm"] = itm
        raw["loss"].update(kd="none", itm_weight=weight)
        raw["teacher"]["enabled"] = False
        torch.manual_seed(0)
        return DistillTask.from_config(Config.model_validate(raw))

    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(4, 3, 32, 32, generator=g), "input_ids": torch.randint(5, 30, (4, 10), generator=g),
             "attention_mask": torch.ones(4, 10, dtype=torch.int64), "image_id": torch.tensor([0, 1, 1, 2])}
    assert "itm" not in task(False)(batch)

    with_head = task(True)
    torch.manual_seed(7)
    out = with_head(batch)
    parts = {k: v.item() for k, v in out.items()}
    assert math.isclose(parts["loss"], (parts["itc"] + parts["itc_interm"]) / 2 + 0.5 * parts["itm"], rel_tol=1e-5)
    model = with_head.model
    img, txt = model(batch["image"], batch["input_ids"], batch["attention_mask"])
    torch.manual_seed(7)
    expected = itm_loss(model, img.tokens, txt.tokens, txt.mask, (img.embedding @ txt.embedding.T).detach(),
                        batch["image_id"], model.scales()[0]).loss
    assert torch.allclose(out["itm"], expected, atol=1e-6)
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.itm_head.parameters())
