"""The paper's teacher: the released self-supervised BEiTv2 file (beitv2_base_patch16_224_pt1k.pth)
loads as it is through configs/paper.yaml, and computes what BEiTv2 computes.

The fake checkpoints here are written key by key from the BEiT authors' pre-training model
(microsoft/unilm beit2/modeling_pretrain.py, `VisionTransformerForMaskedImageModelingCLS` built
by run_beitv2_pretraining.py: shared relative position bias, no absolute position embedding,
layer scale, q/v biases, `lm_head`, `mask_token`, `cls_pt_layers`), saved as their utils.save_model
does (under "model"), with random values everywhere. The reference forward is the BEiT equations
on that raw state dict, with no timm involved.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from unialign.config import TeacherConfig, load_config
from unialign.model import teacher as teacher_module
from unialign.model.teacher import Teacher, load_beit_state_dict

REPO = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4}
LN_EPS = 1e-6  # modeling_pretrain.py's norm_layer: partial(nn.LayerNorm, eps=1e-6)


def relative_position_index(grid: int) -> torch.Tensor:
    """beit2/modeling_finetune.py RelativePositionBias: pairwise index into the bias table, with
    three extra entries for CLS->token, token->CLS and CLS->CLS."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    num_distances = (2 * grid - 1) ** 2 + 3
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel[:, :, 0] * (2 * grid - 1) + rel[:, :, 1]
    index[0, 0:] = num_distances - 3
    index[0:, 0] = num_distances - 2
    index[0, 0] = num_distances - 1
    return index


def released_layout(dim: int, depth: int, heads: int, patch: int, img: int, vocab: int = 8192,
                    cls_pt_layers: int = 2,
                    make: Callable[[tuple[int, ...]], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The state dict of the released pt1k file, key for key, with `make(shape)` values
    (default: random, so a dropped or misplaced tensor changes the output)."""
    def rand(*shape: int) -> torch.Tensor:
        return make(shape) if make is not None else torch.randn(shape) * 0.3

    def around_one(*shape: int) -> torch.Tensor:
        return make(shape) if make is not None else 1 + 0.2 * torch.randn(shape)

    grid = img // patch
    sd: dict[str, torch.Tensor] = {
        "cls_token": rand(1, 1, dim),
        "mask_token": rand(1, 1, dim),
        "patch_embed.proj.weight": rand(dim, 3, patch, patch),
        "patch_embed.proj.bias": rand(dim),
        "rel_pos_bias.relative_position_bias_table": rand((2 * grid - 1) ** 2 + 3, heads),
        "rel_pos_bias.relative_position_index": (relative_position_index(grid) if make is None
                                                 else make((grid * grid + 1,) * 2)),
    }
    prefixes = [f"blocks.{i}." for i in range(depth)] + [f"cls_pt_layers.{i}." for i in range(cls_pt_layers)]
    for p in prefixes:
        sd.update({
            p + "gamma_1": rand(dim), p + "gamma_2": rand(dim),
            p + "norm1.weight": around_one(dim), p + "norm1.bias": rand(dim),
            p + "attn.q_bias": rand(dim), p + "attn.v_bias": rand(dim),
            p + "attn.qkv.weight": rand(3 * dim, dim),
            p + "attn.proj.weight": rand(dim, dim), p + "attn.proj.bias": rand(dim),
            p + "norm2.weight": around_one(dim), p + "norm2.bias": rand(dim),
            p + "mlp.fc1.weight": rand(4 * dim, dim), p + "mlp.fc1.bias": rand(4 * dim),
            p + "mlp.fc2.weight": rand(dim, 4 * dim), p + "mlp.fc2.bias": rand(dim),
        })
    sd.update({"norm.weight": around_one(dim), "norm.bias": rand(dim),
               "lm_head.weight": rand(vocab, dim), "lm_head.bias": rand(vocab)})
    return sd


NOT_FOR_A_TEACHER = ("mask_token", "lm_head.", "cls_pt_layers.", "rel_pos_bias.relative_position_index")


def beit_reference(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int, patch: int, block: int = -1,
                   after_norm: bool = False) -> torch.Tensor:
    """BEiTv2's forward_features (modeling_pretrain.py, no masked patches) on the raw state dict,
    stopped after `block`; the L2-normalised CLS, as the teacher returns it."""
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    b, n, d = x.shape
    hd = d // heads
    index = sd["rel_pos_bias.relative_position_index"]
    # The ONE shared bias, (heads, n, n), added to the attention logits of every block.
    bias = sd["rel_pos_bias.relative_position_bias_table"][index.view(-1)].view(n, n, heads).permute(2, 0, 1)
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    last = depth - 1 if block == -1 else block
    for i in range(last + 1):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=LN_EPS)
        qkv_bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros_like(sd[p + "attn.v_bias"]), sd[p + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], qkv_bias).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        attn = ((q * hd ** -0.5) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        out = F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), sd[p + "attn.proj.weight"],
                       sd[p + "attn.proj.bias"])
        x = x + sd[p + "gamma_1"] * out
        h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=LN_EPS)
        mlp = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                       sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        x = x + sd[p + "gamma_2"] * mlp
    if after_norm:
        x = F.layer_norm(x, (d,), sd["norm.weight"], sd["norm.bias"], eps=LN_EPS)
    return F.normalize(x[:, 0], dim=-1)


@pytest.fixture(scope="module")
def pt1k(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sd = released_layout(TINY["embed_dim"], TINY["depth"], TINY["num_heads"], TINY["patch_size"], TINY["img_size"])
    path = tmp_path_factory.mktemp("beitv2") / "beitv2_base_patch16_224_pt1k.pth"
    torch.save({"model": sd}, path)
    return path, sd


def paper_teacher(checkpoint: Path, *overrides: str) -> TeacherConfig:
    """configs/paper.yaml's teacher section, pointed at `checkpoint`, at the tiny test size."""
    size = [f"teacher.kwargs.{k}={v}" for k, v in TINY.items()]
    cfg = load_config(REPO / "configs" / "paper.yaml", [f"teacher.checkpoint={checkpoint}", *size, *overrides],
                      check_paths=False)
    return cfg.teacher


def test_paper_config_loads_released_pt1k_as_is(pt1k):
    path, sd = pt1k
    cfg = paper_teacher(path, "teacher.after_norm=true")  # after_norm: the final norm is loaded too
    teacher = Teacher(cfg)
    loaded = teacher.backbone.model.state_dict()
    used = {k for k in sd if not k.startswith(NOT_FOR_A_TEACHER)}
    # Every weight of the file a teacher can use is in the model, unchanged, and nothing else is.
    non_derived = {k for k in loaded if not k.endswith("relative_position_index")}
    assert non_derived == used
    for key in used:
        assert torch.equal(loaded[key], sd[key]), key
    # Shared bias stays shared, as in BEiTv2 (one table, not one per block).
    assert teacher.backbone.model.rel_pos_bias is not None
    assert not any("attn.relative_position_bias_table" in k for k in loaded)


@pytest.mark.parametrize(("block", "after_norm"), [(-1, False), (0, False), (-1, True)])
def test_loaded_teacher_equals_beitv2_equations(pt1k, block, after_norm):
    path, sd = pt1k
    cfg = paper_teacher(path, f"teacher.block={block}", f"teacher.after_norm={str(after_norm).lower()}")
    assert (cfg.block, cfg.after_norm) == (block, after_norm)
    teacher = Teacher(cfg)
    torch.manual_seed(1)
    pixels = torch.randn(3, 3, TINY["img_size"], TINY["img_size"])
    expected = beit_reference(sd, pixels, TINY["num_heads"], TINY["patch_size"], block, after_norm)
    assert torch.allclose(teacher(pixels), expected, atol=1e-5)
    # The check can fail: the next block's CLS, or skipping the shared bias, is another target.
    other = beit_reference(sd, pixels, TINY["num_heads"], TINY["patch_size"], 1 if block == 0 else 0, after_norm)
    assert not torch.allclose(expected, other, atol=1e-3)
    no_bias = dict(sd, **{"rel_pos_bias.relative_position_bias_table":
                          torch.zeros_like(sd["rel_pos_bias.relative_position_bias_table"])})
    assert not torch.allclose(expected, beit_reference(no_bias, pixels, TINY["num_heads"], TINY["patch_size"],
                                                       block, after_norm), atol=1e-3)


def test_shared_bias_copied_into_per_block_tables_is_the_same_teacher(pt1k):
    """A config that asks timm for per-block tables (timm's beitv2 default) gets the shared table in
    every block, as the BEiT authors' fine-tuning does, and the same targets."""
    path, sd = pt1k
    cfg = paper_teacher(path, "teacher.kwargs.use_rel_pos_bias=true", "teacher.kwargs.use_shared_rel_pos_bias=false")
    teacher = Teacher(cfg)
    model = teacher.backbone.model
    assert model.rel_pos_bias is None
    for blk in model.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, sd["rel_pos_bias.relative_position_bias_table"])
    pixels = torch.randn(2, 3, TINY["img_size"], TINY["img_size"])
    expected = beit_reference(sd, pixels, TINY["num_heads"], TINY["patch_size"])
    assert torch.allclose(teacher(pixels), expected, atol=1e-5)


def test_paper_teacher_fits_full_size_released_layout(monkeypatch):
    """paper.yaml's teacher (no size kwargs) against the released ViT-B/16 pt1k layout: 12 blocks,
    width 768, 12 heads, 14x14 patches, 8192 visual tokens, 2 CLS-pretraining blocks. Shapes only
    (meta tensors), so no 350 MB file is written."""
    full = released_layout(768, 12, 12, 16, 224, make=lambda shape: torch.empty(shape, device="meta"))
    monkeypatch.setattr(teacher_module, "read_state_dict", lambda path: dict(full))
    cfg = load_config(REPO / "configs" / "paper.yaml", check_paths=False).teacher
    state, kwargs = load_beit_state_dict(Path("beitv2_base_patch16_224_pt1k.pth"), cfg.name, cfg.kwargs)
    assert set(state) == {k for k in full if not k.startswith(NOT_FOR_A_TEACHER)}
    assert kwargs["use_shared_rel_pos_bias"] and not kwargs["use_rel_pos_bias"]
    assert not kwargs["use_abs_pos_emb"]


def _error(path: Path, **size: object) -> str:
    with pytest.raises(ValueError) as info:
        Teacher(paper_teacher(path, *[f"teacher.kwargs.{k}={v}" for k, v in size.items()]))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_vit_checkpoint_is_refused_naming_the_keys(teacher_checkpoint, tmp_path):
    # A DINO-style timm ViT (the conftest stand-in, depth 4): q/k/v bias in one tensor, no layer scale.
    message = _error(teacher_checkpoint, depth=4)
    assert "4 unexpected key(s) [blocks.0.attn.qkv.bias, blocks.1.attn.qkv.bias" in message


def test_random_state_dict_is_refused_with_first_keys_and_count(tmp_path):
    path = tmp_path / "random.pth"
    torch.save({f"layer{i}.weight": torch.randn(2) for i in range(7)}, path)
    message = _error(path)
    assert "7 unexpected key(s) [layer0.weight, layer1.weight, layer2.weight, layer3.weight, layer4.weight, " \
           "... (2 more)]" in message
    assert "missing key(s) [blocks.0.attn.proj.bias" in message


def test_training_checkpoint_without_weights_is_refused(tmp_path):
    path = tmp_path / "dino_full.pth"
    torch.save({"student": {"backbone.cls_token": torch.zeros(1)}, "epoch": 3}, path)
    assert "2 non-tensor entries [epoch, student]" in _error(path)


def test_only_the_pretraining_keys_are_dropped(pt1k, tmp_path):
    _, sd = pt1k
    extra = tmp_path / "extra.pth"
    torch.save({"model": dict(sd, **{"decoder.weight": torch.zeros(2)})}, extra)
    assert "1 unexpected key(s) [decoder.weight]" in _error(extra)
    missing = tmp_path / "missing.pth"
    torch.save({"model": {k: v for k, v in sd.items() if k != "blocks.1.gamma_2"}}, missing)
    assert "1 missing key(s) [blocks.1.gamma_2]" in _error(missing)
    wrong = tmp_path / "wrong_width.pth"
    torch.save({"model": sd}, wrong)
    assert "of another shape" in _error(wrong, embed_dim=32)
