"""The Hugging Face VisionTextDualEncoderModel baseline (training/hf_dual.py), on tiny local towers."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from conftest import tiny_config_dict
from unialign.config import ConfigError, parse_config
from unialign.data.synthetic import make_synthetic_karpathy
from unialign.data.transforms import build_image_transform
from unialign.training.hf_dual import build_hf_dual_encoder, train_hf_dual_encoder
from unialign.training.prefix_cache import shared_prefix_caches
from unialign.training.trainer import train

IMAGE_WIDTH = 48  # differs from the text tower's 64: the projections meet at the image tower's width


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    directory = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=IMAGE_WIDTH, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
                             image_size=28, patch_size=14)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hf_world")
    make_synthetic_karpathy(root, n_images=24, captions_per_image=2, image_size=32, seed=0,
                            split_counts={"train": 16, "test": 8})
    return root


def _raw(world: Path, dinov2_dir: Path, text_model_dir: Path, teacher_checkpoint: Path) -> dict:
    src = {"type": "karpathy", "path": str(world / "dataset_synthetic.json"), "images": str(world),
           "splits": ["train"]}
    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [src], epochs=4, base_lr=2e-3, scale_lr=False,
                           warmup_fraction=0.1)
    raw["model"]["image"] = {"backend": "hf", "name": str(dinov2_dir), "layers": 3, "freeze_layers": 1}
    raw["model"]["text"].update(layers=3, freeze_layers=1)
    raw["data"].update(image_size=28, train_scale=[1.0, 1.0])
    return raw


class _Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core box: one intra-op thread is ~10x faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread, world, dinov2_dir, text_model_dir, teacher_checkpoint, tmp_path_factory):
    cfg = parse_config(_raw(world, dinov2_dir, text_model_dir, teacher_checkpoint))
    losses = _Losses()
    summary = train_hf_dual_encoder(cfg, tmp_path_factory.mktemp("hf_run"), callbacks=[losses])
    return cfg, summary, losses.losses


def test_trains_and_saves_a_transformers_folder(trained):
    cfg, summary, losses = trained
    assert summary["global_step"] == 4 * (16 * 2 // 8) == len(losses)  # 32 pairs, batches of 8, 4 epochs
    assert summary["seconds"] > 0
    folder = Path(summary["folder"])
    assert folder.name == "hf_dual_encoder" and (folder / "config.json").is_file()
    assert not list(folder.parent.glob(".hf_dual_encoder.tmp-*"))  # written atomically, nothing left over
    # HF's loss, finite at every step. (Random tiny towers do not get below chance, ln 8, in 16 steps:
    # the next test checks that training reached every trainable weight and no frozen one.)
    assert all(np.isfinite(losses)), losses


def test_same_kept_layers_and_only_unfrozen_ones_trained(trained, dinov2_dir, text_model_dir):
    from transformers import AutoModel, VisionTextDualEncoderModel

    cfg, summary, _ = trained
    model = VisionTextDualEncoderModel.from_pretrained(summary["folder"])
    assert model.config.projection_dim == IMAGE_WIDTH
    for tower, path, kept in ((model.vision_model, dinov2_dir, cfg.model.image.layers),
                              (model.text_model, text_model_dir, cfg.model.text.layers)):
        assert len(tower.encoder.layer) == tower.config.num_hidden_layers == kept == 3
        pretrained = AutoModel.from_pretrained(path).state_dict()
        for name, value in tower.state_dict().items():
            # freeze_layers 1: the embeddings and block 0 stay the pretrained weights, bit for bit
            frozen = name.startswith(("embeddings.", "encoder.layer.0."))
            if name.endswith("position_ids") or name == "embeddings.mask_token":  # a buffer; an unused token
                continue
            if frozen:
                assert torch.equal(value, pretrained[name]), name
            elif value.is_floating_point():
                assert not torch.equal(value, pretrained[name]), f"{name} was not trained"


def test_saved_preprocessing_is_the_eval_transform(trained, one_thread):
    from transformers import AutoImageProcessor

    from unialign.evaluation.models import load_eval_model

    cfg, summary, _ = trained
    d = cfg.data
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 45, 3), dtype=np.uint8))
    ours = build_image_transform(d.image_size, d.mean, d.std, train=False, interpolation=d.interpolation)(image)
    # The same operations: with transformers' PIL backend the values are ours up to float rounding.
    pil = AutoImageProcessor.from_pretrained(summary["folder"], backend="pil")
    assert torch.allclose(pil(images=image, return_tensors="pt")["pixel_values"][0], ours, atol=1e-5)
    # `hf:` loads the default (torchvision) backend, whose resize rounds a few pixels to the next uint8 level.
    model = load_eval_model("hf:" + summary["folder"], device="cpu")
    theirs = model.preprocess(image)
    one_level = 1 / 255 / min(d.std) + 1e-5
    assert theirs.shape == ours.shape and (theirs - ours).abs().max() <= one_level
    assert ((theirs - ours).abs() > 1e-5).float().mean() < 0.05
    assert model.width == IMAGE_WIDTH


def test_retrieval_evaluation_runs_on_the_saved_folder(trained, world, one_thread):
    from unialign.evaluation.models import load_eval_model
    from unialign.evaluation.run import evaluate_retrieval_model

    _, summary, _ = trained
    model = load_eval_model("hf:" + summary["folder"], device="cpu")
    result = evaluate_retrieval_model(model, karpathy=world / "dataset_synthetic.json", images=world, split="test",
                                      batch_size=8, progress=False)
    from unialign.report import RECALL_KEYS

    assert result["n_images"] == 8 and result["n_captions"] == 16 and result["images_skipped"] == 0
    assert all(0 <= result[key] <= 100 for key in RECALL_KEYS), result


def test_needs_hf_image_backend(world, dinov2_dir, text_model_dir, teacher_checkpoint):
    raw = _raw(world, dinov2_dir, text_model_dir, teacher_checkpoint)
    raw["model"]["image"] = tiny_config_dict(text_model_dir, teacher_checkpoint, [])["model"]["image"]  # timm
    with pytest.raises(ConfigError, match="backend: hf"):
        build_hf_dual_encoder(parse_config(raw))


@pytest.fixture
def embedded(monkeypatch) -> list[int]:
    """The batch sizes the vision model's embeddings (the first frozen part) are run on."""
    from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

    sizes: list[int] = []
    forward = Dinov2Embeddings.forward
    monkeypatch.setattr(Dinov2Embeddings, "forward",
                        lambda self, pixels, *a, **k: sizes.append(len(pixels)) or forward(self, pixels, *a, **k))
    return sizes


def test_cached_frozen_prefix_trains_the_same_model(trained, world, dinov2_dir, text_model_dir, teacher_checkpoint,
                                                    tmp_path, embedded):
    from transformers import VisionTextDualEncoderModel
    cfg, summary, losses = trained
    raw = _raw(world, dinov2_dir, text_model_dir, teacher_checkpoint)
    raw["train"]["cache_frozen_image"] = True
    cached_losses = _Losses()
    cached = train_hf_dual_encoder(parse_config(raw), tmp_path / "run", callbacks=[cached_losses])
    # the frozen embeddings and block 0 computed once per training image (16; 4 epochs of 32 pairs
    # without the cache), then read: the same steps
    assert sum(embedded) == 16 and len(cached_losses.losses) == len(losses) == 16
    assert np.allclose(cached_losses.losses, losses, atol=1e-5), (cached_losses.losses, losses)
    saved = VisionTextDualEncoderModel.from_pretrained(cached["folder"]).state_dict()
    reference = VisionTextDualEncoderModel.from_pretrained(summary["folder"]).state_dict()
    assert saved.keys() == reference.keys()  # saved whole: embeddings and all 3 kept blocks
    for name, value in reference.items():
        assert torch.allclose(saved[name], value, atol=1e-5), name


def test_reads_the_frozen_prefix_an_s_smke_run_computed(trained, world, dinov2_dir, text_model_dir,
                                                       teacher_checkpoint, tmp_path, embedded):
    """Within shared_prefix_caches, after an S-SMKE run on the same image tower, data and frozen block,
    the dual encoder embeds no image and takes the steps it takes alone."""
    _, _, losses = trained
    raw = _raw(world, dinov2_dir, text_model_dir, teacher_checkpoint)
    raw["train"]["cache_frozen_image"] = True
    hf_losses = _Losses()
    smke = copy.deepcopy(raw)
    smke["teacher"]["enabled"], smke["loss"]["kd"] = False, "none"  # the tiny timm teacher takes 32 px only
    with shared_prefix_caches():
        train(parse_config(smke), tmp_path / "smke")
        assert sum(embedded) == 16
        train_hf_dual_encoder(parse_config(raw), tmp_path / "hf", callbacks=[hf_losses])
    assert sum(embedded) == 16
    assert np.allclose(hf_losses.losses, losses, atol=1e-5), (hf_losses.losses, losses)


def test_text_prefix_cache_is_refused(world, dinov2_dir, text_model_dir, teacher_checkpoint, tmp_path):
    raw = _raw(world, dinov2_dir, text_model_dir, teacher_checkpoint)
    raw["train"]["cache_frozen_text"] = True
    with pytest.raises(ConfigError, match="cache_frozen_text"):
        train_hf_dual_encoder(parse_config(raw), tmp_path / "run")
    assert not (tmp_path / "run").exists()
