"""One harness, three model kinds: unialign checkpoints, open_clip and Hugging Face CLIP adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_support import TINY_OPENCLIP, ColourModel, solid, tiny_hf_clip, tiny_openclip, write_manifest

from unialign.evaluation.models import EvalError, load_eval_model
from unialign.evaluation.run import evaluate_retrieval_model

TEXTS = ["a red square", "the blue circle is big", "green"]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, rgb in enumerate([(1.0, 0.0, 0.0), (0.2, 0.4, 0.9), (0.5, 0.5, 0.1)]):
        Image.fromarray(solid(rgb, size=40)).save(root / f"{i}.png")
        paths.append(str(root / f"{i}.png"))
    return paths


@pytest.fixture(scope="module")
def openclip_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    pytest.importorskip("open_clip")
    return tiny_openclip(tmp_path_factory.mktemp("openclip"))


def _check_normalised(model, image_files: list[str], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, kept, skipped = model.encode_images(image_files, batch_size=2, progress=False)
    texts = model.encode_texts(TEXTS, batch_size=2, progress=False)
    assert images.shape == (3, width) and texts.shape == (3, width) and kept == [0, 1, 2] and not skipped
    assert torch.allclose(images.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert model.width == width
    return images, texts


def test_unialign_checkpoint_adapter(tiny_checkpoint: Path, image_files: list[str]) -> None:
    import unialign

    for spec in (str(tiny_checkpoint), f"unialign:{tiny_checkpoint}"):
        model = load_eval_model(spec, "cpu")
        images, texts = _check_normalised(model, image_files, 64)
        assert model.name == spec
    net, preprocess, tokenizer = unialign.load(tiny_checkpoint)
    with torch.no_grad():
        direct = net.encode_text(tokenizer(TEXTS))
        pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in image_files])
        direct_images = net.encode_image(pixels)
    assert torch.allclose(texts, direct, atol=1e-5) and torch.allclose(images, direct_images, atol=1e-5)


def test_openclip_adapter_loads_weights_from_a_file(openclip_model: tuple[str, Path], image_files: list[str]) -> None:
    import open_clip

    arch, weights = openclip_model
    model = load_eval_model(f"openclip:{arch}/{weights}", "cpu")
    images, texts = _check_normalised(model, image_files, TINY_OPENCLIP["embed_dim"])
    reference = open_clip.create_model(arch, pretrained=None)
    reference.load_state_dict(torch.load(weights))
    with torch.no_grad():
        expected = torch.nn.functional.normalize(reference.eval().encode_text(open_clip.get_tokenizer(arch)(TEXTS)))
    assert torch.allclose(texts, expected, atol=1e-5)
    random_init = load_eval_model(f"openclip:{arch}", "cpu")  # no weights: a different (random) model
    assert not torch.allclose(random_init.encode_texts(TEXTS, progress=False), texts)


def test_openclip_local_dir_schema(openclip_model: tuple[str, Path], tmp_path: Path,
                                   image_files: list[str]) -> None:
    _, weights = openclip_model
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENCLIP, "preprocess_cfg": {}}))
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(weights.read_bytes())
    _check_normalised(load_eval_model(f"openclip:local-dir:{tmp_path}", "cpu"), image_files, 16)


def test_hf_clip_adapter(tmp_path: Path, text_model_dir: Path, image_files: list[str]) -> None:
    from transformers import CLIPModel

    path = tiny_hf_clip(tmp_path / "clip", text_model_dir)
    model = load_eval_model(f"hf:{path}", "cpu")
    images, texts = _check_normalised(model, image_files, 16)
    reference = CLIPModel.from_pretrained(path).eval()
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        out = reference.get_text_features(**tokens)
    expected = getattr(out, "pooler_output", out)
    assert torch.allclose(texts, torch.nn.functional.normalize(expected, dim=-1), atol=1e-5)


def test_hf_siglip_pads_to_full_length(tmp_path: Path, text_model_dir: Path, image_files: list[str]) -> None:
    from transformers import BertTokenizerFast, SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = BertTokenizerFast.from_pretrained(text_model_dir)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = SiglipConfig(text_config=dict(vocab_size=len(tok), max_position_embeddings=16, bos_token_id=None,
                                        eos_token_id=None, **small),
                       vision_config=dict(image_size=32, patch_size=8, **small))
    SiglipModel(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model = load_eval_model(f"hf:{tmp_path}", "cpu")
    assert model.tokenize(["red"])["input_ids"].shape == (1, 16)  # as SigLIP was trained, not to the longest
    _check_normalised(model, image_files, 32)


def test_model_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="checkpoint .*missing.ckpt does not exist"):
        load_eval_model(tmp_path / "missing.ckpt", "cpu")
    with pytest.raises(EvalError, match="expected openclip:ARCH"):
        load_eval_model("openclip:", "cpu")
    with pytest.raises(EvalError, match="cannot load"):
        load_eval_model(f"hf:{tmp_path}", "cpu")


def test_manifest_retrieval_by_hand(tmp_path: Path) -> None:
    # Image 2 is blue but captioned "red thing". IR: that caption ranks its image 3rd (below red, tied
    # with green: ties count against), the other 3 captions are exact -> IR@1 = 3/4. TR: the red image's
    # captions tie with "red thing" (rank 1), the blue image's caption ties with all 3 others (rank 3),
    # only the green image is exact -> TR@1 = 1/3, TR@5 = 1.
    manifest = write_manifest(tmp_path, [((1.0, 0.0, 0.0), ["red", "a red one"]), ((0.0, 1.0, 0.0), ["green"]),
                                         ((0.0, 0.0, 1.0), ["red thing"])])
    result = evaluate_retrieval_model(ColourModel(), manifest=manifest, progress=False)
    assert (result["task"], result["model"], result["dataset"]) == ("retrieval", "colour", "manifest")
    assert (result["n_images"], result["n_captions"]) == (3, 4)
    assert result["txt_r1"] == pytest.approx(100 / 3) and result["txt_r5"] == 100.0
    assert result["img_r1"] == pytest.approx(75.0) and result["img_r5"] == 100.0


def test_retrieval_needs_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one of karpathy"):
        evaluate_retrieval_model(ColourModel())


def test_pixel_memo_decodes_each_file_once_per_preprocessing(tiny_checkpoint: Path, image_files: list[str],
                                                             tmp_path: Path, text_model_dir: Path, monkeypatch) -> None:
    """Two models with the same preprocessing, scored on one set with a shared memo: the second decodes
    nothing and gets the embeddings it would get alone; an unreadable file is skipped by both, with the
    same reason; another preprocessing (the Hugging Face adapter's) decodes for itself."""
    import unialign.evaluation.encode as encode
    from unialign.evaluation.encode import PixelMemo

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    files = [*image_files, str(broken)]
    decoded: list[str] = []
    load_image = encode.load_image
    monkeypatch.setattr(encode, "load_image", lambda path: decoded.append(path) or load_image(path))

    alone = load_eval_model(str(tiny_checkpoint), "cpu").encode_images(files, batch_size=2, progress=False)
    assert len(decoded) == 4
    memo, runs = PixelMemo(), []
    for _ in range(2):  # two loads of the checkpoint: equal transforms, not the same object
        decoded.clear()
        runs.append(load_eval_model(str(tiny_checkpoint), "cpu").encode_images(files, batch_size=2, progress=False,
                                                                                memo=memo))
        runs[-1] = (*runs[-1], len(decoded))
    (first, kept1, skipped1, n1), (second, kept2, skipped2, n2) = runs
    assert (n1, n2) == (4, 0)
    assert kept1 == kept2 == alone[1] == [0, 1, 2] and skipped1 == skipped2 == alone[2]
    assert skipped1[0][0] == str(broken)
    assert torch.allclose(first, alone[0]) and torch.allclose(second, alone[0])

    decoded.clear()
    hf = load_eval_model(f"hf:{tiny_hf_clip(tmp_path / 'hf', text_model_dir)}", "cpu")
    hf.encode_images(files, batch_size=2, progress=False, memo=memo)
    assert len(decoded) == 4 and len(memo.entries) == 2
def _checkpoint_variants(folder: Path, text_model_dir: Path, teacher_checkpoint: Path) -> dict[str, str]:
    """Exported models on one tiny tower (2 image blocks): "a" and "b" freeze block 0 and differ above it;
    "all" freezes both blocks, block 0 as theirs; "other" freezes block 0, whose weights differ."""
    from transformers import AutoTokenizer

    from conftest import tiny_config_dict
    from unialign.config import InferenceConfig, ModelConfig, Preprocess
    from unialign.model.factory import create_student, export_checkpoint
    from unialign.model.towers import layer_depth

    raw = tiny_config_dict(text_model_dir, teacher_checkpoint, [])
    torch.manual_seed(0)
    base = None
    paths = {}
    for name, freeze, changed in (("a", 1, 2), ("b", 1, 2), ("all", "all", 2), ("other", 1, 1)):
        spec = InferenceConfig(model=ModelConfig.model_validate(
            {**raw["model"], "image": {**raw["model"]["image"], "freeze_layers": freeze}}),
            preprocess=Preprocess(image_size=raw["data"]["image_size"]))
        model = create_student(spec)
        base = base or model.state_dict()
        model.load_state_dict(base)
        with torch.no_grad():
            if name != "a":
                for pname, param in model.image_tower.named_parameters():
                    if layer_depth(pname, 2) == changed:
                        param.add_(0.05 * torch.randn_like(param))
        paths[name] = str(export_checkpoint(model, spec, AutoTokenizer.from_pretrained(text_model_dir),
                                            folder / f"{name}.ckpt"))
    return paths


def test_frozen_image_blocks_are_computed_once_between_models(image_files: list[str], tmp_path: Path,
                                                              text_model_dir: Path, teacher_checkpoint: Path,
                                                              monkeypatch) -> None:
    """With a shared memo, a model whose frozen blocks another model computed starts above them (from
    the deepest stored: "all" reads block 0's output and runs block 1) and gets the embeddings it gets
    alone; a model with other weights in its frozen block computes its own."""
    from unialign.evaluation.encode import PixelMemo
    from unialign.model.towers import ImageTower

    calls: list[int] = []
    forward_prefix = ImageTower.forward_prefix
    monkeypatch.setattr(ImageTower, "forward_prefix", lambda self, pixels, n: calls.append(len(pixels)) or
                        forward_prefix(self, pixels, n))
    ckpts = _checkpoint_variants(tmp_path, text_model_dir, teacher_checkpoint)
    alone = {k: load_eval_model(v, "cpu").encode_images(image_files, batch_size=2, progress=False)[0]
             for k, v in ckpts.items()}
    assert not calls  # without a memo the tower runs whole
    memo = PixelMemo()
    for name, computed in (("a", 3), ("b", 0), ("all", 0), ("other", 3)):
        calls.clear()
        shared = load_eval_model(ckpts[name], "cpu").encode_images(image_files, batch_size=2, progress=False,
                                                                   memo=memo)[0]
        assert sum(calls) == computed, name
        torch.testing.assert_close(shared, alone[name], rtol=1e-5, atol=1e-5, msg=name)
    assert not torch.allclose(alone["a"], alone["b"])  # the models differ, not only their prefixes


