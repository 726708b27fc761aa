"""Model: truncation keeps pretrained weights, the shared block's outputs, masking, teacher freezing."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from transformers import AutoModel, Dinov2Config, Dinov2Model, ViTConfig, ViTModel

from conftest import TINY_VIT
from unialign.config import TeacherConfig
from unialign.model.smke import LOGIT_SCALE_MAX, SMKE, SharedBlock
from unialign.model.teacher import Teacher
from unialign.model.towers import TextTower, build_image_tower


def test_timm_truncation_keeps_first_blocks_exactly(teacher_checkpoint):
    full = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    full.load_state_dict(torch.load(teacher_checkpoint))
    tower = build_image_tower("timm", "vit_small_patch16_224", pretrained=False, checkpoint=teacher_checkpoint,
                              layers=2, kwargs=TINY_VIT)
    assert len(tower.model.blocks) == 2
    for kept, original in zip(tower.model.blocks, list(full.blocks)[:2]):
        for (name, a), (_, b) in zip(kept.state_dict().items(), original.state_dict().items()):
            assert torch.equal(a, b), name
    # Tokens after block 2 equal running the full model's first two blocks by hand.
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = full.norm_pre(full._pos_embed(full.patch_embed(x)))
        for blk in list(full.blocks)[:2]:
            h = blk(h)
        assert torch.allclose(tower(x), h, atol=1e-6)


def test_timm_every_second_layer_and_bad_index():
    tower = build_image_tower("timm", "vit_small_patch16_224", pretrained=False, layers=[0, 2], kwargs=TINY_VIT)
    assert len(tower.model.blocks) == 2
    with pytest.raises(ValueError, match=r"has 4 blocks; cannot keep block\(s\) \[7\]"):
        build_image_tower("timm", "vit_small_patch16_224", pretrained=False, layers=[0, 7], kwargs=TINY_VIT)


def test_text_truncation_keeps_layers_and_drops_pooler(text_model_dir):
    full = AutoModel.from_pretrained(text_model_dir)
    tower = TextTower(str(text_model_dir), pretrained=True, layers=2)
    assert len(tower.model.encoder.layer) == 2
    assert getattr(tower.model, "pooler", None) is None
    for i in range(2):
        for (name, a), (_, b) in zip(tower.model.encoder.layer[i].state_dict().items(),
                                     full.encoder.layer[i].state_dict().items()):
            assert torch.equal(a, b), name
    for name, a in tower.model.embeddings.state_dict().items():
        assert torch.equal(a, full.embeddings.state_dict()[name]), name


def test_hf_image_tower_truncation(tmp_path):
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                    image_size=32, patch_size=8)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    full = ViTModel.from_pretrained(tmp_path)
    tower = build_image_tower("hf", str(tmp_path), pretrained=True, layers=2)
    assert tower.model.config.num_hidden_layers == 2 and tower.width == 32
    kept = dict(tower.model.named_parameters())
    assert not any(".2." in name for name in kept)
    for name, p in full.named_parameters():
        if name in kept:
            assert torch.equal(p, kept[name]), name
    assert tower(torch.randn(1, 3, 32, 32)).shape == (1, 17, 32)


def test_truncated_dinov2_tower_rebuilds_from_its_saved_config(tmp_path):
    """DINOv2 configs name a backbone stage per layer; a cut tower's config must still build."""
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=28, patch_size=14)
    Dinov2Model(cfg).save_pretrained(tmp_path)
    tower = build_image_tower("hf", str(tmp_path), pretrained=True, layers=2)
    assert tower.hf_config["out_features"] == ["stage2"]
    again = build_image_tower("hf", str(tmp_path), pretrained=False, hf_config=tower.hf_config)
    again.load_state_dict(tower.state_dict())
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(tower.eval()(x), again.eval()(x))


def _model(text_model_dir, **kw) -> SMKE:
    image = build_image_tower("timm", "vit_small_patch16_224", pretrained=False, layers=2, kwargs=TINY_VIT)
    text = TextTower(str(text_model_dir), pretrained=True, layers=2)
    return SMKE(image, text, shared_depth=kw.pop("depth", 1), num_heads=4, kd_dim=48, **kw)


def test_outputs_are_normalised_and_interm_is_first_mlp_layer_cls(text_model_dir):
    model = _model(text_model_dir).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model.image_embeddings(pixels)
        assert out.embedding.shape == (3, 64) and out.interm.shape == (3, 256) and out.kd.shape == (3, 48)
        assert torch.allclose(out.embedding.norm(dim=-1), torch.ones(3), atol=1e-5)
        # Independent recomputation of the shared block.
        tokens = model.image_tower(pixels) + 1e-5 * model.token_type.weight[1]
        blk = model.shared[0]
        h = tokens + blk.ls1.gamma * blk.attn(blk.norm1(tokens))
        fc1 = F.linear(blk.norm2(h), blk.mlp.fc1.weight, blk.mlp.fc1.bias)
        assert torch.allclose(out.interm, F.normalize(fc1[:, 0], dim=-1), atol=1e-5)
        mlp = blk.mlp.fc2(F.gelu(fc1))
        cls = (h + blk.ls2.gamma * mlp)[:, 0]
        assert torch.allclose(out.embedding, F.normalize(cls, dim=-1), atol=1e-5)


def test_cls_only_block_matches_the_full_block_values_and_gradients():
    """What the losses read (the CLS output and x_interm) and every gradient, with padding masked."""
    torch.manual_seed(0)
    block = SharedBlock(64, 4, 4.0, 0.2).train()
    x = torch.randn(3, 7, 64, requires_grad=True)
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    weights = torch.randn(64)
    outs, grads = [], []
    for cls_only in (False, True):
        out, interm = block(x, mask, cls_only=cls_only)
        outs.append((out[:, 0], interm))
        loss = (out[:, 0] * weights).sum().sin() + interm.square().sum()
        grads.append(torch.autograd.grad(loss, [x, *block.parameters()]))
    assert out.shape == (3, 1, 64)
    for a, b in zip(outs[0], outs[1]):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(grads[0], grads[1]):
        assert torch.allclose(a, b, atol=1e-5)
    assert grads[1][0][:, 1:].abs().sum() > 0  # the other positions still feed the CLS (keys and values)


def test_only_a_model_with_an_itm_head_keeps_the_whole_output_sequence(text_model_dir):
    pixels = torch.randn(2, 3, 32, 32)
    plain = _model(text_model_dir).eval()
    with_itm = _model(text_model_dir, itm=True).eval()
    assert not with_itm.load_state_dict(plain.state_dict(), strict=False).unexpected_keys
    with torch.no_grad():
        a, b = plain.image_embeddings(pixels), with_itm.image_embeddings(pixels)
    assert a.tokens is None and b.tokens.shape == (2, 17, 64)  # CLS + 4 x 4 patches
    assert torch.allclose(a.embedding, b.embedding, atol=1e-5)


def test_text_padding_is_masked(text_model_dir):
    model = _model(text_model_dir).eval()
    ids = torch.tensor([[2, 10, 11, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    other_padding = ids.clone()
    other_padding[0, 4:] = 17
    with torch.no_grad():
        a = model.encode_text({"input_ids": ids, "attention_mask": mask})
        b = model.encode_text({"input_ids": other_padding, "attention_mask": mask})
        c = model.encode_text(ids)  # bare ids: mask inferred from the pad id
        # more padding (the collator rounds lengths up to a multiple of 8) changes nothing either
        d = model.encode_text({"input_ids": F.pad(ids, (0, 2)), "attention_mask": F.pad(mask, (0, 2))})
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5) and torch.allclose(a, d, atol=1e-5)


def test_new_parts_init_and_logit_scale_clamp(text_model_dir):
    model = _model(text_model_dir)
    w = model.shared[0].attn.qkv.weight
    assert abs(w.std().item() - 0.02) < 0.003 and abs(w.mean().item()) < 0.002
    assert torch.allclose(model.shared[0].ls1.gamma, torch.full((64,), 0.2))
    assert torch.allclose(model.token_type_scale.gamma, torch.full((64,), 1e-5))
    assert math.isclose(model.scales()[0].item(), 1 / 0.07, rel_tol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
        model.logit_scale_interm.fill_(-3.0)
    model.clamp_scales_()  # what training does after each optimiser step
    main, interm = model.scales()
    assert math.isclose(main.item(), math.exp(LOGIT_SCALE_MAX), rel_tol=1e-5)
    assert math.isclose(interm.item(), 1.0)


def test_shared_depth_zero_and_two(text_model_dir):
    for depth in (0, 2):
        model = _model(text_model_dir, depth=depth, interm_logit_scale=depth > 0).eval()
        out = model.image_embeddings(torch.randn(2, 3, 32, 32))
        assert (out.interm is None) == (depth == 0)
        assert len(model.shared) == depth


def test_teacher_frozen_eval_and_target_block(teacher_checkpoint):
    cfg = TeacherConfig(name="vit_small_patch16_224", pretrained=False, checkpoint=teacher_checkpoint,
                        kwargs=TINY_VIT, block=1)
    teacher = Teacher(cfg)
    teacher.train()
    assert not teacher.training and not teacher.backbone.training
    assert all(not p.requires_grad for p in teacher.parameters())
    full = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **TINY_VIT)
    full.load_state_dict(torch.load(teacher_checkpoint))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = full.norm_pre(full._pos_embed(full.patch_embed(x)))
        for blk in list(full.blocks)[:2]:
            h = blk(h)
    assert torch.allclose(teacher(x), F.normalize(h[:, 0], dim=-1), atol=1e-5)
    # Default: last block, before the final norm; after_norm applies it.
    last = Teacher(TeacherConfig(name="vit_small_patch16_224", pretrained=False, checkpoint=teacher_checkpoint,
                                 kwargs=TINY_VIT))
    normed = Teacher(TeacherConfig(name="vit_small_patch16_224", pretrained=False, checkpoint=teacher_checkpoint,
                                   kwargs=TINY_VIT, after_norm=True))
    with torch.no_grad():
        feats = full.forward_features(x)  # includes the final norm
        pre = full.blocks(full.norm_pre(full._pos_embed(full.patch_embed(x))))
    assert torch.allclose(normed(x), F.normalize(feats[:, 0], dim=-1), atol=1e-5)
    assert torch.allclose(last(x), F.normalize(pre[:, 0], dim=-1), atol=1e-5)


def test_export_and_load_roundtrip_offline(tiny_checkpoint):
    import unialign

    model, preprocess, tokenizer = unialign.load(tiny_checkpoint)
    assert not model.training
    from PIL import Image

    pixels = preprocess(Image.new("RGB", (40, 30), (200, 10, 10))).unsqueeze(0)
    assert pixels.shape == (1, 3, 32, 32)
    img = model.encode_image(pixels)
    txt = model.encode_text(tokenizer(["a red square", "blue"]))
    assert img.shape == (1, 64) and txt.shape == (2, 64)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(2), atol=1e-5)
    again, _, _ = unialign.load(tiny_checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("image_backend, kd, shared_depth", [
    ("timm", "contrastive", 1), ("timm", "none", 1), ("timm", "mse", 1), ("timm", "contrastive", 0),
    ("timm", "none", 2), ("hf-dinov2", "contrastive", 1), ("hf-beit", "none", 1)])
def test_every_trained_parameter_gets_a_gradient(image_backend, kd, shared_depth, text_model_dir,
                                                  teacher_checkpoint, tmp_path):
    """What DDP needs at every step (a trainable parameter without a gradient stops it at the
    second step): checked on one training loss, for each tower kind, distillation choice and
    shared depth.
    Found this way: the KD head of runs without KD, DINOv2/BEiT's mask token."""
    from transformers import AutoTokenizer, BeitConfig, BeitModel

    from conftest import tiny_config_dict
    from unialign.config import parse_config
    from unialign.training.module import SMKETraining

    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "manifest", "path": str(manifest)}])
    raw["loss"]["kd"] = kd
    raw["teacher"]["enabled"] = kd != "none"
    raw["model"]["shared"]["depth"] = shared_depth
    raw["loss"]["itc_interm"] = shared_depth > 0
    size = 32
    if image_backend != "timm":
        size = 28
        hf_dir = tmp_path / image_backend
        shape = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
                 "image_size": size, "patch_size": 14}
        if image_backend == "hf-dinov2":
            Dinov2Model(Dinov2Config(**shape)).save_pretrained(hf_dir)
        else:
            BeitModel(BeitConfig(**shape, use_mask_token=True)).save_pretrained(hf_dir)
        raw["model"]["image"] = {"backend": "hf", "name": str(hf_dir), "layers": 2}
        raw["model"]["shared"]["num_heads"] = 2
        raw["teacher"] = {"backend": "hf", "name": str(hf_dir), "enabled": kd != "none"}
        raw["data"]["image_size"] = size
    module = SMKETraining(parse_config(raw).model_dump(mode="json")).train()
    tokenizer = AutoTokenizer.from_pretrained(text_model_dir)
    tokens = tokenizer(["a red circle", "two blue squares on top", "a cat", "a green star"], padding=True,
                       return_tensors="pt")
    batch = {"image": torch.randn(4, 3, size, size), "input_ids": tokens["input_ids"],
             "attention_mask": tokens["attention_mask"], "image_id": torch.arange(4)}
    module.task(batch)["loss"].backward()
    missing = [name for name, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert (module.model.kd_head is None) == (kd == "none")


def test_teacher_view_with_colour_jitter(text_model_dir, teacher_checkpoint):
    """The thesis's teacher view: its own crop/flip and a colour jitter; only with view: separate."""
    from PIL import Image

    from conftest import tiny_config_dict
    from unialign.config import Config
    from unialign.model.teacher import Teacher

    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [{"type": "manifest", "path": "unused.jsonl"}])
    raw["data"]["train_scale"] = [1.0, 1.0]  # no crop and (tiny config) no flip: only the jitter varies
    raw["teacher"]["color_jitter"] = [0.4, 0.4, 0.4]
    with pytest.raises(ValueError, match="teacher.color_jitter needs teacher.view: separate"):
        Config.model_validate(raw)
    raw["teacher"]["view"] = "separate"
    cfg = Config.model_validate(raw)
    img = Image.new("RGB", (40, 40), (120, 80, 40))
    jittered = Teacher(cfg.teacher).train_transform(cfg.data, cfg.teacher_image_size)
    torch.manual_seed(0)
    means = [float(jittered(img).mean()) for _ in range(8)]
    assert max(means) - min(means) > 0.05  # brightness/contrast/saturation drawn per call
    raw["teacher"]["color_jitter"] = None
    cfg = Config.model_validate(raw)
    plain = Teacher(cfg.teacher).train_transform(cfg.data, cfg.teacher_image_size)
    assert len({round(float(plain(img).mean()), 6) for _ in range(4)}) == 1


@pytest.mark.parametrize("dropout", [None, 0.0])
def test_text_dropout_option(text_model_dir, dropout):
    """`model.text.dropout` sets the tower's hidden and attention dropout (paper.yaml: 0.0, what the
    author's BERT effectively ran with); None keeps the model's own (BERT: 0.1)."""
    from unialign.model.towers import TextTower

    tower = TextTower(str(text_model_dir), pretrained=True, layers=2, dropout=dropout).train()
    cfg = tower.model.config
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == (0.1 if dropout is None else 0.0)
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    a = tower.model(input_ids=ids).last_hidden_state
    b = tower.model(input_ids=ids).last_hidden_state
    assert torch.equal(a, b) == (dropout == 0.0)
