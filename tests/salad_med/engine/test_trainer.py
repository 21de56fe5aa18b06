"""The progressive trainer: exact resume, val-only selection, method switches, checkpoint contents."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.trainer import SaladTrainer, epoch_round, loss_for_method
from salad_med.errors import ConfigError, DataError
from salad_med.evaluation.inference import load_run, read_checkpoint
from tests.conftest import TINY_OVERRIDES, write_tiny_split


class _Kill(Exception):
    """Stands in for a killed process after an epoch's checkpoint was written."""


def _kill(_trainer, _row):
    raise _Kill


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_tiny_split(tmp_path_factory.mktemp("trainer_data"), n=32, preprocessed=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("trainer_cache")


def _datasets(cfg, split, cache):
    ds = build_datasets(cfg, load_split_manifest(split), cache)
    return ds["train"], ds["val"]


def _cfg(*extra):
    return load_config("demo", [*TINY_OVERRIDES, "train.max_steps_per_epoch=2", *extra])


@pytest.mark.parametrize(("method", "schedule"), [("salad", "paper"), ("salad", "official"), ("deep_svdd", "paper")])
def test_resume_is_exact(method, schedule, split, cache, tmp_path):
    cfg = _cfg(f"train.method={method}", f"train.schedule={schedule}", "train.augment_views=1")
    train, val = _datasets(cfg, split, cache)
    straight = SaladTrainer(cfg, train, val, tmp_path / "a")
    straight.fit()

    killed = SaladTrainer(cfg, train, val, tmp_path / "b", callbacks=[_kill])
    with pytest.raises(_Kill):
        killed.fit()
    assert read_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = SaladTrainer(cfg, train, val, tmp_path / "b", resume=True)
    assert resumed.epoch == 1
    resumed.fit()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if straight.bank is not None:
        assert torch.equal(straight.bank.features, resumed.bank.features)
    cols = ["epoch", "round", "loss_total", "loss_ss", "loss_agg", "val_auc"]
    pd.testing.assert_frame_equal(pd.DataFrame(straight.history)[cols], pd.DataFrame(resumed.history)[cols])
    assert pd.read_csv(tmp_path / "b" / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_resume_refuses_another_config(split, cache, tmp_path):
    cfg = _cfg()
    train, val = _datasets(cfg, split, cache)
    SaladTrainer(cfg, train, val, tmp_path / "run").fit()
    with pytest.raises(ConfigError, match=r"train\.lr"):
        SaladTrainer(_cfg("train.lr=0.01"), train, val, tmp_path / "run", resume=True)
    # device / workers may change on resume
    SaladTrainer(_cfg("data.num_workers=0", "train.device=cpu"), train, val, tmp_path / "run", resume=True)


@pytest.mark.parametrize("method", ["salad", "salad_no_rec", "salad_no_agg", "memdae", "dae", "deep_svdd"])
def test_methods_train_and_score(method, split, cache, tmp_path):
    cfg = _cfg(f"train.method={method}", "train.max_steps_per_epoch=1")
    train, val = _datasets(cfg, split, cache)
    trainer = SaladTrainer(cfg, train, val, tmp_path / method)
    init_bank = None if trainer.bank is None else trainer.bank.features.clone()
    trainer.fit()
    last = trainer.history[-1]  # round 1: L_agg active for salad and salad_no_rec
    for key in ("loss_total", "loss_rec", "loss_ss", "loss_agg", "loss_svdd"):
        assert math.isfinite(last[key])
    expect_nonzero = {
        "salad": {"loss_rec", "loss_ss", "loss_agg"}, "salad_no_rec": {"loss_ss", "loss_agg"},
        "salad_no_agg": {"loss_rec", "loss_ss"}, "memdae": {"loss_rec"}, "dae": {"loss_rec"},
        "deep_svdd": {"loss_svdd"},
    }[method]
    for key in ("loss_rec", "loss_ss", "loss_agg", "loss_svdd"):
        assert (last[key] != 0) == (key in expect_nonzero), key
    assert (trainer.bank is not None) == (method in {"salad", "salad_no_rec", "salad_no_agg", "memdae"})
    if init_bank is not None:
        assert not torch.allclose(init_bank, trainer.bank.features)  # momentum updates happened
        assert torch.allclose(trainer.bank.features.norm(dim=1), torch.ones(len(train)), atol=1e-5)
    model = load_run(tmp_path / method)
    scores = model.score_dataset(val)
    assert scores["score"].between(0, 1).all() and scores["raw_score"].notna().all()
    assert scores["score"].min() == 0.0 and scores["score"].max() == 1.0  # normalisation fitted on val


def test_selection_uses_val_only(tmp_path):
    split = write_tiny_split(tmp_path / "imgs", n=32)
    df = pd.read_csv(split)
    df.loc[df["split"] == "test", "source_path"] = str(tmp_path / "no_such_file.png")  # reading test would fail
    df.to_csv(split, index=False)
    cfg = load_config("demo", [*TINY_OVERRIDES, "train.pretrain_epochs=2", "train.rounds=1",
                               "train.epochs_per_round=1"])
    train, val = _datasets(cfg, split, tmp_path / "cache")
    trainer = SaladTrainer(cfg, train, val, tmp_path / "run")
    trainer.fit()
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    best = read_checkpoint(tmp_path / "run" / "best.pt")
    assert best["epoch"] == int(metrics.loc[metrics["val_auc"].idxmax(), "epoch"])
    assert best["val"]["auc"] == pytest.approx(metrics["val_auc"].max())
    assert metrics["best"].sum() >= 1 and bool(metrics.loc[metrics["val_auc"].idxmax(), "best"])
    # a test-split dataset can never be handed to the trainer
    test = build_datasets(cfg, load_split_manifest(write_tiny_split(tmp_path / "ok", n=32)), tmp_path / "c2",
                          splits=("test",))["test"]
    with pytest.raises(DataError, match="never test"):
        SaladTrainer(cfg, train, test, tmp_path / "bad")
    with pytest.raises(DataError, match="never test"):
        SaladTrainer(cfg, test, val, tmp_path / "bad")


def test_checkpoint_contents(split, cache, tmp_path):
    cfg = _cfg()
    train, val = _datasets(cfg, split, cache)
    SaladTrainer(cfg, train, val, tmp_path / "run").fit()
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("model", "optimizer", "bank", "scorer", "neighbourhoods", "rng", "config", "arch_signature",
                "epoch", "round", "global_step"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["round"] == 1 and ckpt["global_step"] == 4
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python", "generator"}
    assert ckpt["bank"]["features"].shape == (len(train), 16)
    assert ckpt["neighbourhoods"]["k"] == 4
    assert ckpt["config"]["train"]["method"] == "salad"
    # the scorer's bank drops the known anomaly (row 0 of train)
    assert ckpt["scorer"]["bank"].shape == (len(train) - 1, 16)
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.csv", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name


def test_schedule_helpers():
    cfg = load_config("demo", ["train.pretrain_epochs=3", "train.rounds=2", "train.epochs_per_round=2"])
    assert [epoch_round(e, cfg) for e in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    memdae = loss_for_method(load_config("demo", ["train.method=memdae"]))
    assert memdae.use_rec and not memdae.use_ss and not memdae.use_agg
    salad = loss_for_method(load_config("demo", ["train.rec_loss=l1", "train.lam=0.5"]))
    assert salad.use_rec and salad.use_ss and salad.use_agg and salad.rec_kind == "l1" and salad.lam == 0.5
    with pytest.raises(ConfigError, match="must be > 0"):
        SaladTrainer(load_config("demo", ["train.pretrain_epochs=0", "train.rounds=0"]), None, None, "x")


@pytest.mark.parametrize("view_loss", ["query", "aug_set"])
def test_views_enter_the_sample_specific_loss(view_loss, split, cache, tmp_path):
    from salad_med.methods.salad.loss import SampleSpecificLoss, reconstruction_loss

    cfg = _cfg("train.augment_views=2", f"train.view_loss={view_loss}")
    train, val = _datasets(cfg, split, cache)
    trainer = SaladTrainer(cfg, train, val, tmp_path / "run")
    train.set_epoch(0)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    x, idx, views = batch["image"], batch["index"], batch["views"]
    b, v = views.shape[:2]
    trainer.model.train()
    with torch.no_grad():
        z_all = trainer.model.encode(torch.cat([x, views.flatten(0, 1)]))
        x_hat = trainer.model.decode(z_all[:b])
    bank = trainer.bank.features.clone()
    if view_loss == "query":  # every view is a query for its image's bank row: -log p(idx_i | w_ia)
        expected_ss = SampleSpecificLoss(tau=cfg.train.tau)(z_all, bank, torch.cat([idx, idx.repeat_interleave(v)]))
    else:  # views join the positives of z_i
        expected_ss = SampleSpecificLoss(tau=cfg.train.tau)(z_all[:b], bank, idx, z_all[b:].reshape(b, v, -1))
    out = trainer.train_step(batch)
    assert out["ss"] == pytest.approx(float(expected_ss), rel=1e-5)
    assert out["rec"] == pytest.approx(float(reconstruction_loss(x_hat, x)), rel=1e-5)
    assert out["total"] == pytest.approx(out["rec"] + cfg.train.lam * out["ss"], rel=1e-5)


def test_val_every_and_resume_before_first_validation(split, cache, tmp_path):
    from salad_med.errors import CheckpointError

    cfg = _cfg("train.val_every=2")
    train, val = _datasets(cfg, split, cache)
    with pytest.raises(_Kill):
        SaladTrainer(cfg, train, val, tmp_path / "run", callbacks=[_kill]).fit()
    assert read_checkpoint(tmp_path / "run" / "last.pt")["scorer"] is None
    assert not (tmp_path / "run" / "best.pt").exists()
    with pytest.raises(CheckpointError, match="no fitted scorer"):
        load_run(tmp_path / "run", "last")
    SaladTrainer(cfg, train, val, tmp_path / "run", resume=True).fit()
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["val_auc"].isna().tolist() == [True, False]
    assert load_run(tmp_path / "run").epoch == 2


def test_one_image_last_batch_is_dropped_not_fatal(split, cache, tmp_path):
    """BatchNorm cannot train on a 1-image batch: with N = k * batch + 1 that batch is dropped."""
    cfg = _cfg("train.max_steps_per_epoch=0", "train.pretrain_epochs=1", "train.rounds=0")
    train, val = _datasets(cfg, split, cache)
    batch = len(train) - 1  # N = 1 * batch + 1
    cfg = _cfg("train.max_steps_per_epoch=0", "train.pretrain_epochs=1", "train.rounds=0",
               f"train.batch_size={batch}")
    trainer = SaladTrainer(cfg, train, val, tmp_path / "run")
    assert trainer.train_loader.drop_last and len(trainer.train_loader) == 1
    trainer.fit()
    assert trainer.global_step == 1
    even = SaladTrainer(_cfg("train.batch_size=2"), train, val, tmp_path / "even")
    assert even.train_loader.drop_last == (len(train) % 2 == 1)
    group = SaladTrainer(_cfg(f"train.batch_size={batch}", "model.norm=group"), train, val, tmp_path / "group")
    assert not group.train_loader.drop_last  # no BatchNorm: every image of every epoch is used
