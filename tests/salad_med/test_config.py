"""Config loading: defaults, shipped configs, overrides, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from salad_med.config import CONFIG_DIR, Config, config_to_dict, load_config, save_config
from salad_med.errors import ConfigError

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_defaults_are_the_paper_hyperparameters():
    cfg = load_config()
    assert isinstance(cfg, Config)
    t = cfg.train
    assert (t.lr, t.beta1, t.beta2, t.batch_size) == (1e-4, 0.5, 0.999, 16)
    assert (t.tau, t.lam, t.bank_momentum, t.k) == (0.1, 0.25, 0.5, 100)
    assert (t.pretrain_epochs, t.rounds, t.epochs_per_round) == (50, 10, 50)
    assert t.rec_loss == "mse" and t.schedule == "paper" and cfg.score.mode == "paper"
    assert cfg.model.latent_dim == 200


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path):
    cfg = load_config(path)
    assert cfg.data.image_size >= 16


def test_shipped_configs_exist():
    assert {"mura.yaml", "nih.yaml", "demo.yaml"} <= {p.name for p in SHIPPED}


def test_name_resolves_to_configs_dir():
    assert load_config("nih").model.arch == "conv6"
    assert load_config("mura").model.arch == "resnet18"


def test_overrides_parse_yaml_scalars():
    cfg = load_config("demo", ["train.lr=0.003", "model.arch=resnet18", "data.augment=false", "seed=7"])
    assert cfg.train.lr == pytest.approx(0.003)
    assert cfg.model.arch == "resnet18"
    assert cfg.data.augment is False
    assert cfg.seed == 7


def test_exponent_without_dot_is_a_float():
    assert load_config(None, ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(None, ["train.lr=1e-4x"])


def test_int_accepted_for_float():
    assert load_config(None, ["train.lam=1"]).train.lam == 1.0


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ({"train": {"lrr": 1}}, "train.lrr: unknown key"),
        ({"train": {"lr": "fast"}}, "train.lr: expected float"),
        ({"train": {"batch_size": 0}}, "train.batch_size: 0 is below the minimum 1"),
        ({"train": {"bank_momentum": 1.5}}, "train.bank_momentum: 1.5 is above the maximum 1.0"),
        ({"model": {"arch": "vgg"}}, "model.arch: 'vgg' is not one of"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"train": 3}, "train.: expected a mapping"),
        ({"train": {"batch_size": True}}, "train.batch_size: expected int"),
    ],
)
def test_invalid_values_name_key_and_file(tmp_path: Path, content, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_override_names_key():
    with pytest.raises(ConfigError, match=r"train\.k: -1 is below the minimum 1"):
        load_config("demo", ["train.k=-1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config("demo", ["train.k"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("demo", ["train.nope=1"])


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)


def test_save_round_trip(tmp_path: Path):
    cfg = load_config("demo", ["train.lr=0.01"])
    out = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(out) == cfg
    assert config_to_dict(load_config(out))["train"]["lr"] == 0.01
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp file left


def test_base_configs_merge_and_loops_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  lr: 0.002\n  tau: 0.2\nmodel:\n  arch: conv6\n")
    (tmp_path / "b.yaml").write_text("base: a\ntrain:\n  tau: 0.3\n")
    (tmp_path / "c.yaml").write_text("base: [b, official]\ntrain:\n  lam: 1.5\n")
    cfg = load_config(tmp_path / "c.yaml")
    # a < b < official < c: nested keys merge, the including file wins
    assert (cfg.train.lr, cfg.train.tau, cfg.train.lam, cfg.model.arch) == (0.002, 0.3, 1.5, "conv6")
    assert (cfg.train.schedule, cfg.train.bank_update, cfg.score.mode) == ("official", "view", "official")
    (tmp_path / "loop.yaml").write_text("base: loop2\n")
    (tmp_path / "loop2.yaml").write_text("base: loop\n")
    with pytest.raises(ConfigError, match="base' chain loops"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("base: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml: base: expected a config name"):
        load_config(tmp_path / "bad.yaml")


def test_official_preset_is_the_official_recipe():
    cfg = load_config("official")
    t = cfg.train
    assert (t.beta1, t.weight_decay, t.batch_size, t.rec_loss, t.schedule) == (0.9, 1e-6, 32, "l1", "official")
    assert (t.bank_update, cfg.data.augmentation, cfg.score.mode) == ("view", "flip", "official")


def test_zero_learning_rate_is_refused():
    with pytest.raises(ConfigError, match=r"train.lr: 0.0 must be above 0.0"):
        load_config(None, ["train.lr=0"])
