"""Config: bad input is rejected before any work, naming the key, value or path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from unialign.config import ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture()
def raw(tmp_path: Path) -> dict:
    (tmp_path / "pairs.jsonl").write_text('{"image": "a.png", "caption": "x"}\n')
    return {"data": {"train": [{"type": "manifest", "path": str(tmp_path / "pairs.jsonl")}]}}


def test_albef_config_is_the_paper_recipe_with_albefs_options_on():
    paper = load_config(REPO / "configs" / "paper.yaml", check_paths=False)
    albef = load_config(REPO / "configs" / "albef_options.yaml", check_paths=False)
    assert not paper.loss.uses_momentum_model and not paper.model.itm  # the paper's model stays the paper's
    assert albef.model.itm and (albef.loss.queue_size, albef.loss.mod_alpha, albef.loss.momentum) == (65536, 0.4, 0.995)
    options = {("loss", "queue_size"), ("loss", "mod_alpha"), ("loss", "momentum"), ("loss", "itm_weight"),
               ("model", "itm")}
    a, b = paper.model_dump(mode="json"), albef.model_dump(mode="json")
    for section, key in options:
        del a[section][key], b[section][key]
    assert a == b


def test_paper_config_holds_the_recipe():
    cfg = load_config(REPO / "configs" / "paper.yaml", check_paths=False)
    assert (cfg.model.image.layers, cfg.model.text.layers, cfg.model.shared.depth) == (6, 6, 1)
    assert cfg.model.text.max_length == 64 and cfg.teacher.name.startswith("beitv2")
    # the thesis's teacher view: its own crop, flip and colour jitter
    assert cfg.teacher.view == "separate" and cfg.teacher.color_jitter == (0.4, 0.4, 0.4)
    assert cfg.model.text.dropout == 0.0  # the author's BERT ran in eval mode
    assert cfg.loss.bank_size == 65536 and cfg.loss.kd == "contrastive" and cfg.loss.kd_temperature == 0.07
    t = cfg.train
    assert (t.epochs, t.batch_size, t.devices, t.base_lr, t.warmup_fraction) == (7, 256, 2, 1e-4, 0.1)
    assert t.base_lr * t.batch_size * t.devices / 256 == pytest.approx(2e-4)
    assert t.betas == (0.9, 0.98) and t.eps == 1e-6 and t.weight_decay == 0.01
    assert cfg.data.train_scale == (0.9, 1.0) and cfg.data.image_size == 224
    assert sum(s.size for s in cfg.data.train if s.type == "webdataset") == 1516133 + 1181988


def test_unknown_key_is_named(tmp_path, raw):
    raw["train"] = {"batch_sise": 3}
    with pytest.raises(ConfigError, match=r"train\.batch_sise: Extra inputs are not permitted"):
        load_config(_write(tmp_path, raw))


def test_wrong_type_is_named_with_value(tmp_path, raw):
    with pytest.raises(ConfigError, match=r"train\.batch_size: .*integer.*'many'"):
        load_config(_write(tmp_path, raw), ["train.batch_size=many"])


def test_missing_file_is_named(tmp_path, raw):
    raw["data"]["train"][0]["path"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"data\.train\.0\.path: .*nope\.jsonl does not exist"):
        load_config(_write(tmp_path, raw))


def test_missing_local_shards_are_named(tmp_path, raw):
    raw["data"]["train"].append({"type": "webdataset", "urls": str(tmp_path / "s-{000..002}.tar"), "size": 9})
    with pytest.raises(ConfigError, match=r"data\.train\.1\.urls: shard .*s-000\.tar does not exist \(and 2 more\)"):
        load_config(_write(tmp_path, raw))


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_inconsistent_settings_rejected(tmp_path, raw):
    with pytest.raises(ConfigError, match="itc_interm needs model.shared.depth >= 1"):
        load_config(_write(tmp_path, raw), ["model.shared.depth=0"])
    with pytest.raises(ConfigError, match="teacher.enabled is false"):
        load_config(_write(tmp_path, raw), ["teacher.enabled=false"])
    with pytest.raises(ConfigError, match="train.strategy: fsdp needs a GPU"):
        load_config(_write(tmp_path, raw), ["train.strategy=fsdp", "train.accelerator=cpu"])


def test_overrides_parse_yaml_values_and_index_lists(raw):
    out = apply_overrides(raw, ["train.base_lr=3e-5", "model.image.layers=[0, 2, 4]", "data.train.0.images=/x"])
    assert out["train"]["base_lr"] == 3e-5
    assert out["model"]["image"]["layers"] == [0, 2, 4]
    assert out["data"]["train"][0]["images"] == "/x"
    assert "train" not in raw  # the input is not mutated
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides(raw, ["train.epochs"])
