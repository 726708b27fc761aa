"""Data2Vec 2.0 image backend: fairseq checkpoint conversion, equality with fairseq's equations,
clear errors for wrong files, and the config route.

Fake checkpoints use fairseq's released key layout with random weights (no hub access here).
The reference forward is written from fairseq's code (examples/data2vec/models/: modalities/
images.py, modalities/base.py `contextualized_features`, modalities/modules.py `AltBlock`,
`AltAttention`, `BlockEncoder`, mae.py `get_2d_sincos_pos_embed`) with plain torch ops on the raw
fairseq state dict, independently of unialign's module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unialign.model.data2vec2 import Data2Vec2Arch, Data2Vec2Encoder, convert_fairseq_checkpoint, load_converted
from unialign.model.towers import build_image_tower

DIM, HEADS, IMG, PATCH, DEPTH = 64, 4, 32, 8, 4
IMAGE = "modality_encoders.IMAGE."
BLOCK_SHAPES = {"norm1.weight": (DIM,), "norm1.bias": (DIM,), "attn.qkv.weight": (3 * DIM, DIM),
                "attn.qkv.bias": (3 * DIM,), "attn.proj.weight": (DIM, DIM), "attn.proj.bias": (DIM,),
                "norm2.weight": (DIM,), "norm2.bias": (DIM,), "mlp.fc1.weight": (4 * DIM, DIM),
                "mlp.fc1.bias": (4 * DIM,), "mlp.fc2.weight": (DIM, 4 * DIM), "mlp.fc2.bias": (DIM,)}


def _weight(shape: tuple[int, ...], name: str, g: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=g)
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm.weight"):
        return 1 + 0.2 * noise  # LayerNorm gains near 1, not all equal
    return noise * (0.1 if len(shape) > 1 else 0.05)


def fake_encoder_state(g: torch.Generator, prenet_depth: int, depth: int) -> dict[str, torch.Tensor]:
    shapes = {IMAGE + "local_encoder.proj.weight": (DIM, 3, PATCH, PATCH), IMAGE + "local_encoder.proj.bias": (DIM,),
              IMAGE + "extra_tokens": (1, 1, DIM), IMAGE + "context_encoder.norm.weight": (DIM,),
              IMAGE + "context_encoder.norm.bias": (DIM,)}
    for i in range(prenet_depth):
        shapes.update({f"{IMAGE}context_encoder.blocks.{i}.{k}": s for k, s in BLOCK_SHAPES.items()})
    for j in range(depth):
        shapes.update({f"blocks.{j}.{k}": s for k, s in BLOCK_SHAPES.items()})
    state = {k: _weight(s, k, g) for k, s in shapes.items()}
    # Random positions (fairseq stores its fixed table as a parameter): a tower that ignored the
    # file's table and used its own would not match the reference.
    state[IMAGE + "fixed_positional_encoder.positions"] = torch.randn(1, (IMG // PATCH) ** 2, DIM, generator=g)
    return state


def fake_fairseq_checkpoint(path: Path, prenet_depth: int = 0, depth: int = DEPTH, seed: int = 0,
                            extra: dict | None = None) -> dict:
    """What fairseq's trainer saves for `data2vec_multi` on images: cfg, the model's state dict
    (encoder + Decoder2d + `_ema`, the EMA copy), optimizer history."""
    g = torch.Generator().manual_seed(seed)
    model = fake_encoder_state(g, prenet_depth, depth)
    for i in range(2):  # Decoder2d: grouped conv + LayerNorm without affine + GELU per layer, then proj
        model[f"{IMAGE}decoder.blocks.{i}.0.weight"] = torch.randn(32, 4 if i else DIM // 16, 3, 3, generator=g)
        model[f"{IMAGE}decoder.blocks.{i}.0.bias"] = torch.randn(32, generator=g)
    model[IMAGE + "decoder.proj.weight"] = torch.randn(DIM, 32, generator=g)
    model[IMAGE + "decoder.proj.bias"] = torch.randn(DIM, generator=g)
    model["_ema"] = fake_encoder_state(g, prenet_depth, depth)
    ckpt = {"args": None, "model": model,
            "cfg": {"model": {"_name": "data2vec_multi", "depth": depth, "num_heads": HEADS, "embed_dim": DIM,
                              "norm_eps": 1e-6, "layer_norm_first": False, "supported_modality": "IMAGE",
                              "modalities": {"image": {"prenet_depth": prenet_depth, "patch_size": PATCH,
                                                       "input_size": IMG, "num_extra_tokens": 1}}}},
            "optimizer_history": [{"criterion_name": "ModelCriterion", "num_updates": 10}],
            "extra_state": {"previous_training_time": 1.0}, **(extra or {})}
    torch.save(ckpt, path)
    return ckpt


def fairseq_forward(sd: dict[str, torch.Tensor], pixels: torch.Tensor, blocks: int | None = None) -> torch.Tensor:
    """fairseq's image feature path with `layer_norm_first: false`, on the raw state dict."""
    x = F.conv2d(pixels, sd[IMAGE + "local_encoder.proj.weight"], sd[IMAGE + "local_encoder.proj.bias"],
                 stride=PATCH).flatten(2).transpose(1, 2)
    x = x + sd[IMAGE + "fixed_positional_encoder.positions"]  # positions before the CLS
    x = torch.cat([sd[IMAGE + "extra_tokens"].expand(x.shape[0], -1, -1), x], dim=1)
    x = F.layer_norm(x, (DIM,), sd[IMAGE + "context_encoder.norm.weight"], sd[IMAGE + "context_encoder.norm.bias"],
                     1e-6)
    prenet = sorted({int(k.split(".")[4]) for k in sd if k.startswith(IMAGE + "context_encoder.blocks.")})
    main = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
    prefixes = [f"{IMAGE}context_encoder.blocks.{i}." for i in prenet] + [f"blocks.{j}." for j in main]
    b, n, d = x.shape
    for p in prefixes[:blocks]:
        q, k, v = F.linear(x, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        a = F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        x = F.layer_norm(x + a, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)  # post-LN
        h = F.gelu(F.linear(x, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        m = F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = F.layer_norm(x + m, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
    return x


def fairseq_sincos(embed_dim: int, grid_size: int) -> np.ndarray:
    """mae.py's get_2d_sincos_pos_embed(cls_token=False), transcribed."""
    grid = np.stack(np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32)), 0)
    grid = grid.reshape([2, 1, grid_size, grid_size])

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prenet_depth", [0, 2])
def test_conversion_loads_with_no_missing_or_unexpected_keys(tmp_path, prenet_depth):
    ckpt = fake_fairseq_checkpoint(tmp_path / "d2v.pt", prenet_depth=prenet_depth, depth=DEPTH - prenet_depth)
    done = convert_fairseq_checkpoint(tmp_path / "d2v.pt", tmp_path / "out.pt")
    arch, state = load_converted(tmp_path / "out.pt")
    assert arch == Data2Vec2Arch(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    assert done.arch == arch and done.prenet_depth == prenet_depth
    assert done.dropped == {"_ema": len(ckpt["model"]["_ema"]), IMAGE + "decoder.": 6}
    result = Data2Vec2Encoder(arch).load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert not any("decoder" in k or "ema" in k for k in state)
    sd = ckpt["model"]
    # fairseq's prenet blocks come first, then its shared blocks.
    first = f"{IMAGE}context_encoder.blocks.0." if prenet_depth else "blocks.0."
    assert torch.equal(state["blocks.0.attn.qkv.weight"], sd[first + "attn.qkv.weight"])
    assert torch.equal(state[f"blocks.{prenet_depth}.mlp.fc2.bias"], sd["blocks.0.mlp.fc2.bias"])
    assert torch.equal(state["pos_embed"], sd[IMAGE + "fixed_positional_encoder.positions"])


@pytest.mark.parametrize("prenet_depth, layers", [(0, None), (0, 2), (2, None), (2, 3)])
def test_tower_equals_fairseq_equations(tmp_path, pixels, prenet_depth, layers):
    sd = fake_fairseq_checkpoint(tmp_path / "d2v.pt", prenet_depth=prenet_depth, depth=DEPTH - prenet_depth)["model"]
    convert_fairseq_checkpoint(tmp_path / "d2v.pt", tmp_path / "out.pt")
    tower = build_image_tower("data2vec2", "unused", pretrained=True, checkpoint=tmp_path / "out.pt", layers=layers)
    assert tower.num_blocks == (layers or DEPTH) and tower.width == DIM
    assert {m.eps for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}  # cfg.model.norm_eps
    with torch.no_grad():
        ours, ref = tower(pixels), fairseq_forward(sd, pixels, layers)
    assert ours.shape == (2, 1 + (IMG // PATCH) ** 2, DIM)
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    if layers is not None:  # truncation really drops blocks: the full model differs
        assert not torch.allclose(ours, fairseq_forward(sd, pixels), atol=1e-3)


def test_ema_weights_convert_on_request(tmp_path, pixels):
    sd = fake_fairseq_checkpoint(tmp_path / "d2v.pt")["model"]
    done = convert_fairseq_checkpoint(tmp_path / "d2v.pt", tmp_path / "ema.pt", ema=True)
    assert done.dropped == {}  # the EMA copy has no decoder
    tower = build_image_tower("data2vec2", "", pretrained=True, checkpoint=tmp_path / "ema.pt")
    with torch.no_grad():
        assert torch.allclose(tower(pixels), fairseq_forward(sd["_ema"], pixels), atol=1e-5)
        assert not torch.allclose(tower(pixels), fairseq_forward(sd, pixels), atol=1e-3)


def test_random_init_positions_are_fairseqs_table():
    tower = build_image_tower("data2vec2", "", pretrained=False, layers=2,
                              kwargs={"img_size": 48, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2})
    expected = torch.from_numpy(fairseq_sincos(32, 6)).float()[None]
    assert torch.allclose(tower.model.pos_embed, expected, atol=1e-6)
    assert tower.num_blocks == 2 and tower.hf_config["depth"] == 2
    assert not any("pos_embed" in name for name, _ in tower.named_parameters())  # fixed, never trained


def test_wrong_files_give_one_line_errors(tmp_path, teacher_checkpoint):
    fake_fairseq_checkpoint(tmp_path / "d2v.pt")
    with pytest.raises(ValueError, match=r"^.*teacher.pth: not a fairseq Data2Vec 2.0 image checkpoint"):
        convert_fairseq_checkpoint(teacher_checkpoint, tmp_path / "out.pt")
    with pytest.raises(ValueError, match=r"d2v.pt is not a converted data2vec2 checkpoint.*unialign convert"):
        build_image_tower("data2vec2", "", pretrained=True, checkpoint=tmp_path / "d2v.pt")
    with pytest.raises(ValueError, match=r"needs `checkpoint` when pretrained is true"):
        build_image_tower("data2vec2", "", pretrained=True)

    ckpt = torch.load(tmp_path / "d2v.pt")
    ckpt["model"][IMAGE + "alibi_scale"] = torch.ones(1, 1, 1, 1, 1)
    del ckpt["model"]["blocks.1.norm2.bias"]
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd.pt: unknown key\(s\) .*: modality_encoders.IMAGE.alibi_scale$"):
        convert_fairseq_checkpoint(tmp_path / "odd.pt", tmp_path / "out.pt")
    del ckpt["model"][IMAGE + "alibi_scale"]
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"odd.pt: missing key\(s\) blocks.1.norm2.bias \(our names\)$"):
        convert_fairseq_checkpoint(tmp_path / "odd.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()

    del ckpt["cfg"]
    torch.save(ckpt | {"model": torch.load(tmp_path / "d2v.pt")["model"]}, tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match=r"no cfg.model.num_heads"):
        convert_fairseq_checkpoint(tmp_path / "nocfg.pt", tmp_path / "out.pt")
    assert convert_fairseq_checkpoint(tmp_path / "nocfg.pt", tmp_path / "out.pt", num_heads=HEADS).arch.num_heads == 4
    with pytest.raises(ValueError, match=r"disagree with"):
        build_image_tower("data2vec2", "", pretrained=True, checkpoint=tmp_path / "out.pt", kwargs={"num_heads": 8})


def test_pickled_objects_need_trust(tmp_path):
    """Old fairseq checkpoints keep an argparse.Namespace under "args": not loadable as weights only."""
    fake_fairseq_checkpoint(tmp_path / "old.pt", extra={"args": argparse.Namespace(arch="data2vec_multi")})
    with pytest.raises(ValueError, match=r"old.pt: holds Python objects besides tensors .*trust_pickle"):
        convert_fairseq_checkpoint(tmp_path / "old.pt", tmp_path / "out.pt")
    convert_fairseq_checkpoint(tmp_path / "old.pt", tmp_path / "out.pt", trust_pickle=True)
    assert load_converted(tmp_path / "out.pt")[0].depth == DEPTH


def test_cli_convert(tmp_path, capsys, teacher_checkpoint):
    from unialign.cli import main

    fake_fairseq_checkpoint(tmp_path / "d2v.pt", prenet_depth=1, depth=3)
    main(["convert", "data2vec2", str(tmp_path / "d2v.pt"), str(tmp_path / "out.pt")])
    out = capsys.readouterr().out
    assert "4 blocks (1 from the modality prenet), width 64, 4 heads, 32px / patch 8" in out
    assert "dropped modality_encoders.IMAGE.decoder.* (6 tensors)" in out and "dropped _ema*" in out
    assert load_converted(tmp_path / "out.pt")[0].depth == 4
    with pytest.raises(SystemExit, match=r"^unialign: error: .*teacher.pth: not a fairseq Data2Vec 2.0"):
        main(["convert", "data2vec2", str(teacher_checkpoint), str(tmp_path / "bad.pt")])


def test_config_route_builds_trains_and_reloads(tmp_path, pixels, text_model_dir, teacher_checkpoint):
    from transformers import AutoTokenizer

    from conftest import tiny_config_dict
    from unialign.config import InferenceConfig, ModelConfig, Preprocess
    from unialign.model.factory import create_student, export_checkpoint, load
    from unialign.model.towers import Data2Vec2ImageTower

    sd = fake_fairseq_checkpoint(tmp_path / "d2v.pt")["model"]
    convert_fairseq_checkpoint(tmp_path / "d2v.pt", tmp_path / "d2v_converted.pt")
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [])["model"]
    raw["image"] = {"backend": "data2vec2", "checkpoint": str(tmp_path / "d2v_converted.pt"), "layers": 2,
                    "freeze_layers": 1}
    with pytest.raises(ValueError, match=r"checkpoint is required with backend data2vec2 and pretrained true"):
        ModelConfig.model_validate({**raw, "image": {"backend": "data2vec2"}})
    spec = InferenceConfig(model=ModelConfig.model_validate(raw), kd_dim=64, preprocess=Preprocess(image_size=32))
    model = create_student(spec).train()
    tower = model.image_tower
    assert isinstance(tower, Data2Vec2ImageTower) and tower.num_blocks == 2
    with torch.no_grad():
        assert torch.allclose(tower.eval()(pixels), fairseq_forward(sd, pixels, 2), atol=1e-5)
    model.train()
    # freeze_layers 1: patch embedding, CLS, input norm and block 0 are fixed (and in eval mode).
    frozen = {n for n, p in tower.named_parameters() if not p.requires_grad}
    assert {"model.cls_token", "model.norm_pre.weight", "model.blocks.0.attn.qkv.weight"} <= frozen
    assert not any(n.startswith("model.blocks.1.") for n in frozen) and not tower.model.blocks[0].training
    ids = torch.randint(5, 20, (2, 6))
    image, text = model(pixels, ids, torch.ones_like(ids))
    (image.embedding @ text.embedding.T).sum().add(image.kd.sum() + text.kd.sum()).backward()
    no_grad = [n for n, p in tower.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad and tower.model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0

    # The exported checkpoint rebuilds the tower without the converted file.
    path = export_checkpoint(model, spec, AutoTokenizer.from_pretrained(text_model_dir), tmp_path / "m.ckpt")
    (tmp_path / "d2v_converted.pt").unlink()
    again, _, _ = load(path)
    with torch.no_grad():
        assert torch.allclose(again.encode_image(pixels), model.eval().encode_image(pixels), atol=1e-6)


def test_paper_config_image_section_is_data2vec2(tmp_path, pixels):
    from unialign.config import load_config

    repo = Path(__file__).resolve().parents[1]
    sd = fake_fairseq_checkpoint(tmp_path / "d2v.pt")["model"]
    convert_fairseq_checkpoint(tmp_path / "d2v.pt", tmp_path / "out.pt")
    cfg = load_config(repo / "configs" / "paper.yaml", [f"model.image.checkpoint={tmp_path / 'out.pt'}"],
                      check_paths=False).model.image
    assert (cfg.backend, cfg.pretrained, cfg.layers) == ("data2vec2", True, 6)
    tower = build_image_tower(cfg.backend, cfg.name, cfg.pretrained, cfg.checkpoint, layers=3, kwargs=cfg.kwargs)
    with torch.no_grad():
        assert torch.allclose(tower(pixels), fairseq_forward(sd, pixels, 3), atol=1e-5)
