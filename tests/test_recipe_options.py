"""Options for training well at small scale: frozen tower layers, per-part learning rates, text
mean pooling into the CLS position, linear heads (and the LiT-style baseline they make)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from conftest import TINY_VIT, tiny_config_dict
from unialign.config import parse_config
from unialign.data.synthetic import make_synthetic_karpathy
from unialign.model.smke import SMKE
from unialign.model.towers import TextTower, build_image_tower, layer_depth
from unialign.training.trainer import CHECKPOINT_DIR, FINAL, train


def _model(text_model_dir, **kw) -> SMKE:
    torch.manual_seed(0)
    image = build_image_tower("timm", "vit_small_patch16_224", pretrained=False, layers=2, kwargs=TINY_VIT)
    text = TextTower(str(text_model_dir), pretrained=True, layers=2)
    return SMKE(image, text, shared_depth=kw.pop("depth", 1), num_heads=4, kd_dim=48,
                interm_logit_scale=kw.pop("interm", True), **kw)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("world")
    make_synthetic_karpathy(root, n_images=48, captions_per_image=2, image_size=32, seed=0,
                            split_counts={"train": 40, "test": 8})
    return root


def _config(world, text_model_dir, teacher_checkpoint, model=None, **train):
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": ["train"]}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], **train)
    for part, values in (model or {}).items():
        if isinstance(values, dict):
            raw["model"].setdefault(part, {}).update(values)
        else:
            raw["model"][part] = values
    return raw


def test_layer_depth_names_of_timm_and_transformers_towers():
    assert layer_depth("model.patch_embed.proj.weight", 4) == 0
    assert layer_depth("model.cls_token", 4) == 0
    assert layer_depth("model.embeddings.word_embeddings.weight", 4) == 0
    assert layer_depth("model.blocks.0.attn.qkv.weight", 4) == 1
    assert layer_depth("model.encoder.layer.3.output.dense.bias", 4) == 4
    assert layer_depth("model.norm.weight", 4) == 5  # after the blocks


def test_text_mean_pool_puts_the_masked_mean_at_the_cls_position(text_model_dir):
    cls_model = _model(text_model_dir).eval()
    mean_model = _model(text_model_dir, text_pool="mean").eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0], [2, 12, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        got = mean_model.encode_text({"input_ids": ids, "attention_mask": mask})
        # Independent computation: tower tokens, masked mean written into position 0, shared block.
        tokens = mean_model.text_tower(ids, mask)
        mean = torch.stack([tokens[i, : int(mask[i].sum())].mean(0) for i in range(len(ids))])
        tokens = torch.cat([mean[:, None], tokens[:, 1:]], 1) + 1e-5 * mean_model.token_type.weight[0]
        out, _ = mean_model.shared[0](tokens, mask.bool()[:, None, None, :])
        want = F.normalize(out[:, 0], dim=-1)
        cls = cls_model.encode_text({"input_ids": ids, "attention_mask": mask})
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, cls, atol=1e-3)  # same weights (seed 0), only the pooling differs


def test_linear_heads_project_the_cls(text_model_dir):
    model = _model(text_model_dir, head="linear").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = model.encode_image(pixels)
        tokens = model.image_tower(pixels) + 1e-5 * model.token_type.weight[1]
        cls = model.shared[0](tokens)[0][:, 0]
        want = F.normalize(model.image_head(cls), dim=-1)
    assert torch.allclose(got, want, atol=1e-5)
    assert model.text_head is not None and model.text_head.weight.std().item() == pytest.approx(0.02, abs=0.005)


def test_freeze_layers_fixes_embeddings_and_first_blocks_in_eval_mode(text_model_dir):
    model = _model(text_model_dir)
    model.freeze(1, "all")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text_tower.") for n in trainable)
    assert not any(n.startswith(("image_tower.model.blocks.0.", "image_tower.model.patch_embed",
                                 "image_tower.model.cls_token")) for n in trainable)
    assert any(n.startswith("image_tower.model.blocks.1.") for n in trainable)
    unfrozen = _model(text_model_dir)
    unfrozen.freeze(0, 0)  # the default: everything trains, dropout included
    assert all(p.requires_grad for n, p in unfrozen.named_parameters() if "mask_token" not in n)
    assert unfrozen.train().text_tower.model.embeddings.dropout.training
    model.train()
    assert not model.text_tower.training and not model.image_tower.model.blocks[0].training
    assert model.image_tower.model.blocks[1].training and model.shared.training
    # A frozen text tower is a fixed function: no dropout in train mode.
    ids = torch.tensor([[2, 10, 11, 3]])
    a = model.text_tower(ids, torch.ones_like(ids))
    b = model.text_tower(ids, torch.ones_like(ids))
    assert torch.equal(a, b)


def test_lr_scales_per_part_and_layer_decay(text_model_dir):
    model = _model(text_model_dir)
    scales = model.lr_scales(tower_scale=0.1, layer_decay=0.5)
    assert scales["shared.0.attn.qkv.weight"] == 1.0 and scales["logit_scale"] == 1.0
    assert scales["image_tower.model.blocks.1.mlp.fc1.weight"] == pytest.approx(0.1)  # last of 2 blocks
    assert scales["image_tower.model.blocks.0.mlp.fc1.weight"] == pytest.approx(0.05)
    assert scales["image_tower.model.patch_embed.proj.weight"] == pytest.approx(0.025)
    word = next(n for n in scales if n.endswith("word_embeddings.weight"))
    assert scales[word] == pytest.approx(0.025)


class Grab(Callback):
    def __init__(self) -> None:
        self.groups = []
        self.names = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.names = {id(p): n for n, p in pl_module.named_parameters()}
        self.groups = [({self.names[id(p)] for p in g["params"]}, g["initial_lr"], g["weight_decay"])
                       for g in trainer.optimizers[0].param_groups]


def test_training_uses_the_part_rates_and_leaves_frozen_layers_alone(world, text_model_dir, teacher_checkpoint,
                                                                     tmp_path):
    raw = _config(world, text_model_dir, teacher_checkpoint, model={"image": {"freeze_layers": 1}},
                  max_steps=3, base_lr=1e-3, batch_size=8, tower_lr_scale=0.1, warmup_fraction=0.0)
    grab = Grab()
    before = None

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            nonlocal before
            before = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    train(parse_config(raw), tmp_path / "run", callbacks=[grab, Snapshot()])
    lr = 1e-3 * 8 / 256
    by_name = {n: (group_lr, wd) for names, group_lr, wd in grab.groups for n in names}
    assert by_name["model.shared.0.attn.qkv.weight"] == (pytest.approx(lr), 0.01)
    assert by_name["model.image_tower.model.blocks.1.attn.qkv.weight"] == (pytest.approx(0.1 * lr), 0.01)
    assert "model.image_tower.model.blocks.0.attn.qkv.weight" not in by_name  # frozen: not in the optimizer
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT_DIR / FINAL, map_location="cpu", weights_only=True)
    after = {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    assert torch.equal(after["image_tower.model.blocks.0.attn.qkv.weight"],
                       before["image_tower.model.blocks.0.attn.qkv.weight"])
    assert not torch.equal(after["image_tower.model.blocks.1.attn.qkv.weight"],
                           before["image_tower.model.blocks.1.attn.qkv.weight"])


def test_lit_baseline_trains_only_its_heads(world, text_model_dir, teacher_checkpoint, tmp_path):
    """Frozen towers, no shared block, linear heads, mean-pooled text: LiT's baseline in the same trainer."""
    raw = _config(world, text_model_dir, teacher_checkpoint,
                  model={"image": {"freeze_layers": "all"}, "text": {"freeze_layers": "all", "pool": "mean"},
                         "shared": {"depth": 0}, "head": "linear"},
                  max_steps=2, batch_size=8)
    raw["teacher"]["enabled"] = False
    raw["loss"] = {"kd": "none", "itc_interm": False}
    grab = Grab()
    train(parse_config(raw), tmp_path / "run", callbacks=[grab])
    trained = set().union(*(names for names, _, _ in grab.groups))
    assert trained == {"model.image_head.weight", "model.image_head.bias", "model.text_head.weight",
                       "model.text_head.bias", "model.logit_scale", "model.token_type.weight",
                       "model.token_type_scale.gamma"}
    from unialign.model.factory import load

    model, _, _ = load(tmp_path / "run" / CHECKPOINT_DIR / FINAL)
    assert model.text_pool == "mean" and model.image_head is not None and len(model.shared) == 0
