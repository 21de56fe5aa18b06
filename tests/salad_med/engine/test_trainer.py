"""The trainer: exact resume, val-only selection, every registered method, checkpoint contents, refusals."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.checkpoint import read_checkpoint
from salad_med.engine.trainer import Trainer, train_from_manifest
from salad_med.errors import ConfigError, DataError, RunExistsError
from salad_med.evaluation.inference import load_run
from salad_med.methods.registry import available_methods, get_method
from tests.conftest import TINY_OVERRIDES, Killed, kill_after_epoch, write_tiny_split


def _datasets(cfg, split, cache):
    ds = build_datasets(cfg, load_split_manifest(split), cache)
    return ds["train"], ds["val"]


def _cfg(*extra):
    return load_config("demo", [*TINY_OVERRIDES, "train.max_steps_per_epoch=2", *extra])


@pytest.mark.parametrize(("method", "schedule"), [("salad", "paper"), ("salad", "official"), ("deep_svdd", "paper")])
def test_resume_is_exact(method, schedule, split, cache, tmp_path):
    cfg = _cfg(f"train.method={method}", f"train.schedule={schedule}", "train.augment_views=1")
    train, val = _datasets(cfg, split, cache)
    straight = Trainer(cfg, train, val, tmp_path / "a")
    straight.fit()

    killed = Trainer(cfg, train, val, tmp_path / "b", callbacks=[kill_after_epoch])
    with pytest.raises(Killed):
        killed.fit()
    assert read_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    torch.manual_seed(1234)  # disturb the global RNG: the checkpoint must restore it
    resumed = Trainer(cfg, train, val, tmp_path / "b", resume=True)
    assert resumed.epoch == 1
    resumed.fit()

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if straight.method.has_bank:
        assert torch.equal(straight.method.bank.features, resumed.method.bank.features)
    cols = ["epoch", "phase", "loss_total", *[f"loss_{k}" for k in straight.method.loss_keys], "val_auc"]
    pd.testing.assert_frame_equal(pd.DataFrame(straight.history)[cols], pd.DataFrame(resumed.history)[cols])
    assert pd.read_csv(tmp_path / "b" / "metrics.csv")["epoch"].tolist() == [1, 2]


def test_resume_refuses_another_config(split, cache, tmp_path):
    cfg = _cfg()
    train, val = _datasets(cfg, split, cache)
    Trainer(cfg, train, val, tmp_path / "run").fit()
    with pytest.raises(ConfigError, match=r"train\.lr"):
        Trainer(_cfg("train.lr=0.01"), train, val, tmp_path / "run", resume=True)
    # device / workers may change on resume
    Trainer(_cfg("data.num_workers=0", "train.device=auto", "train.channels_last=false", "train.deterministic=false"),
            train, val, tmp_path / "run", resume=True)


@pytest.mark.parametrize("method", available_methods())
def test_methods_train_and_score(method, split, cache, tmp_path):
    cfg = _cfg(f"train.method={method}", "train.max_steps_per_epoch=1")
    train, val = _datasets(cfg, split, cache)
    trainer = Trainer(cfg, train, val, tmp_path / method)
    has_bank = trainer.method.has_bank
    init_bank = trainer.method.bank.features.clone() if has_bank else None
    trainer.fit()
    last = trainer.history[-1]  # round 1: L_agg active for salad and salad_no_rec
    expect_nonzero = {
        "salad": {"loss_rec", "loss_ss", "loss_agg"}, "salad_no_rec": {"loss_ss", "loss_agg"},
        "salad_no_agg": {"loss_rec", "loss_ss"}, "memdae": {"loss_rec"}, "dae": {"loss_rec"},
        "deep_svdd": {"loss_svdd"},
    }.get(method)
    if trainer.method.trains_network:
        for key in trainer.method.loss_keys:
            assert math.isfinite(last[f"loss_{key}"])
        if expect_nonzero is not None:
            assert {f"loss_{k}" for k in trainer.method.loss_keys if last[f"loss_{k}"] != 0} == expect_nonzero
    else:  # fitted once, no gradient steps
        assert trainer.global_step == 0 and last["phase"] == "fit" and trainer.epoch == 0
    assert has_bank == (method in {"salad", "salad_no_rec", "salad_no_agg", "memdae"})
    if init_bank is not None:
        assert not torch.allclose(init_bank, trainer.method.bank.features)  # momentum updates happened
        assert torch.allclose(trainer.method.bank.features.norm(dim=1), torch.ones(len(train)), atol=1e-5)
    model = load_run(tmp_path / method)
    scores = model.score_dataset(val)
    assert scores["score"].between(0, 1).all() and scores["raw_score"].notna().all()
    # calibrated on the val normals: each is scored by its mid-rank among them, (i - 0.5) / n
    normals = scores[scores["label"] == 0].sort_values("raw_score")
    n = len(normals)
    assert normals["score"].to_numpy() == pytest.approx([(i + 0.5) / n for i in range(n)], abs=1e-6) or \
        normals["raw_score"].duplicated().any()


def test_selection_uses_val_only(tmp_path):
    split = write_tiny_split(tmp_path / "imgs", n=32)
    df = pd.read_csv(split)
    df.loc[df["split"] == "test", "source_path"] = str(tmp_path / "no_such_file.png")  # reading test would fail
    df.to_csv(split, index=False)
    cfg = load_config("demo", [*TINY_OVERRIDES, "train.pretrain_epochs=2", "train.rounds=1",
                               "train.epochs_per_round=1"])
    train, val = _datasets(cfg, split, tmp_path / "cache")
    trainer = Trainer(cfg, train, val, tmp_path / "run")
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
        Trainer(cfg, train, test, tmp_path / "bad")
    with pytest.raises(DataError, match="never test"):
        Trainer(cfg, test, val, tmp_path / "bad")


def test_checkpoint_contents(split, cache, tmp_path):
    cfg = _cfg()
    train, val = _datasets(cfg, split, cache)
    Trainer(cfg, train, val, tmp_path / "run").fit()
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    for key in ("model", "optimizer", "method_state", "scorer", "calibration", "ood", "rng", "config",
                "arch_signature", "epoch", "global_step", "salad_med_version"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4
    assert set(ckpt["rng"]) >= {"torch", "numpy", "python", "generator"}
    assert ckpt["method_state"]["bank"]["features"].shape == (len(train), 16)
    assert ckpt["method_state"]["neighbourhoods"]["k"] == 4
    assert ckpt["config"]["train"]["method"] == "salad"
    # the scorer's bank drops the known anomaly (row 0 of train)
    assert ckpt["scorer"]["kind"] == "BankScorer" and ckpt["scorer"]["fitted"]["bank_"].shape == (len(train) - 1, 16)
    assert ckpt["calibration"]["kind"] == "ecdf" and ckpt["calibration"]["n_fit"] == int((val.labels == 0).sum())
    assert ckpt["ood"]["regions"] == ["upper_limb"]  # XR_HAND / XR_WRIST
    for name in ("best.pt", "last.pt", "config.yaml", "metrics.csv", "curves.png"):
        assert (tmp_path / "run" / name).is_file(), name


def test_schedule_helpers(split, cache):
    cfg = load_config("demo", ["train.pretrain_epochs=3", "train.rounds=2", "train.epochs_per_round=2"])
    salad = get_method("salad")(cfg)
    assert [salad.round_of(e) for e in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert salad.num_epochs() == 7
    memdae = get_method("memdae")(load_config("demo", ["train.method=memdae"])).build_loss()
    assert memdae.use_rec and not memdae.use_ss and not memdae.use_agg
    loss = get_method("salad")(load_config("demo", ["train.rec_loss=l1", "train.lam=0.5",
                                                     "train.rec_reduction=sum"])).build_loss()
    assert loss.use_rec and loss.use_ss and loss.use_agg and loss.rec_kind == "l1" and loss.lam == 0.5
    assert loss.pixel_reduction == "sum"
    cfg0 = load_config("demo", [*TINY_OVERRIDES, "train.pretrain_epochs=0", "train.rounds=0"])
    train, val = _datasets(cfg0, split, cache)
    with pytest.raises(ConfigError, match="must be > 0"):
        Trainer(cfg0, train, val, "x")


def test_refusals_before_training(split, cache, tmp_path):
    """K >= the normal bank rows, a one-class val split, an existing run: clear errors, nothing trained."""
    cfg = _cfg("score.k=15")
    train, val = _datasets(cfg, split, cache)
    rows = int((~train.known_anomaly).sum())  # 15 normal train images
    with pytest.raises(ConfigError, match=rf"score.k=15 is not below the {rows} normal training images.*at most 14"):
        Trainer(cfg, train, val, tmp_path / "k")
    one_class = load_split_manifest(split)
    one_class = one_class[~((one_class["split"] == "val") & (one_class["label"] == 1))]
    one_class.to_csv(tmp_path / "one_class.csv", index=False)
    with pytest.raises(DataError, match="val split has only normal"):
        train_from_manifest(_cfg(), tmp_path / "one_class.csv", tmp_path / "one")
    # a finished run is never silently replaced
    train_from_manifest(_cfg(), split, tmp_path / "done")
    before = (tmp_path / "done" / "best.pt").read_bytes()
    with pytest.raises(RunExistsError, match="--resume.*--overwrite"):
        train_from_manifest(_cfg(), split, tmp_path / "done")
    assert (tmp_path / "done" / "best.pt").read_bytes() == before
    train_from_manifest(_cfg("train.lr=0.01"), split, tmp_path / "done", overwrite=True)
    assert read_checkpoint(tmp_path / "done" / "best.pt")["config"]["train"]["lr"] == 0.01


@pytest.mark.parametrize("view_loss", ["query", "aug_set"])
def test_views_enter_the_sample_specific_loss(view_loss, split, cache, tmp_path):
    from salad_med.methods.components.reconstruction import reconstruction_loss
    from salad_med.methods.salad.loss import SampleSpecificLoss

    cfg = _cfg("train.augment_views=2", f"train.view_loss={view_loss}")
    train, val = _datasets(cfg, split, cache)
    trainer = Trainer(cfg, train, val, tmp_path / "run")
    train.set_epoch(0)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    x, idx, views = batch["image"], batch["index"], batch["views"]
    b, v = views.shape[:2]
    trainer.model.train()
    with torch.no_grad():
        z_all = trainer.model.encode(torch.cat([x, views.flatten(0, 1)]))
        x_hat = trainer.model.decode(z_all[:b])
    bank = trainer.method.bank.features.clone()
    if view_loss == "query":  # every view is a query for its image's bank row: -log p(idx_i | w_ia)
        expected_ss = SampleSpecificLoss(tau=cfg.train.tau)(z_all, bank, torch.cat([idx, idx.repeat_interleave(v)]))
    else:  # views join the positives of z_i
        expected_ss = SampleSpecificLoss(tau=cfg.train.tau)(z_all[:b], bank, idx, z_all[b:].reshape(b, v, -1))
    out = trainer.train_step(batch)
    assert out["ss"] == pytest.approx(float(expected_ss), rel=1e-5)
    assert out["rec"] == pytest.approx(float(reconstruction_loss(x_hat, x, pixel_reduction=cfg.train.rec_reduction)),
                                       rel=1e-5)
    assert out["total"] == pytest.approx(out["rec"] + cfg.train.lam * out["ss"], rel=1e-5)


def test_val_every_and_resume_before_first_validation(split, cache, tmp_path):
    from salad_med.errors import CheckpointError

    cfg = _cfg("train.val_every=2")
    train, val = _datasets(cfg, split, cache)
    with pytest.raises(Killed):
        Trainer(cfg, train, val, tmp_path / "run", callbacks=[kill_after_epoch]).fit()
    assert read_checkpoint(tmp_path / "run" / "last.pt")["scorer"] is None
    assert not (tmp_path / "run" / "best.pt").exists()
    with pytest.raises(CheckpointError, match="no fitted scorer/calibration"):
        load_run(tmp_path / "run", "last")
    Trainer(cfg, train, val, tmp_path / "run", resume=True).fit()
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
    trainer = Trainer(cfg, train, val, tmp_path / "run")
    assert trainer.train_loader.drop_last and len(trainer.train_loader) == 1
    trainer.fit()
    assert trainer.global_step == 1
    even = Trainer(_cfg("train.batch_size=2"), train, val, tmp_path / "even")
    assert even.train_loader.drop_last == (len(train) % 2 == 1)
    group = Trainer(_cfg(f"train.batch_size={batch}", "model.norm=group"), train, val, tmp_path / "group")
    assert not group.train_loader.drop_last  # no BatchNorm: every image of every epoch is used


def test_refreshed_bank_and_test_time_augmentation(split, cache, tmp_path):
    """score.bank=refresh scores against eval-mode embeddings of the normal train images; score.tta averages
    the query over flipped/shifted copies; the loaded run scores exactly like that."""
    from salad_med.methods.components.tta import encode_tta

    cfg = _cfg("score.bank=refresh", "score.tta=flipshift")
    train, val = _datasets(cfg, split, cache)
    Trainer(cfg, train, val, tmp_path / "run").fit()
    run = load_run(tmp_path / "run")
    normal = [train.image(i) for i in range(len(train)) if not train.known_anomaly[i]]
    bank = encode_tta(run.model, torch.stack(normal), "flipshift")
    torch.testing.assert_close(run.scorer.bank_, torch.nn.functional.normalize(bank, dim=1), atol=1e-5, rtol=0)
    x = torch.stack([val.image(i) for i in range(4)])
    expected = run.scorer.score_samples(encode_tta(run.model, x, "flipshift"))
    assert run.raw_score_tensor(x).numpy() == pytest.approx(expected, rel=1e-6)


def test_view_bank_update_trains_on_the_augmented_image(split, cache, tmp_path):
    """train.bank_update=view (official code): the step's image is the first augmented view; the bank row
    gets that view's embedding, not the plain image's."""
    cfg = _cfg("train.bank_update=view", "data.augmentation=flip", "train.augment_views=1",
               "train.bank_momentum=1.0", "train.lr=1e-9")
    train, val = _datasets(cfg, split, cache)
    trainer = Trainer(cfg, train, val, tmp_path / "run")
    train.set_epoch(0)
    trainer.sampler.set_epoch(0)
    batch = next(iter(trainer.train_loader))
    view = batch["views"][:, 0]
    trainer.train_step(batch)  # momentum 1: the rows become the (normalised) step embeddings
    trainer.model.train()
    with torch.no_grad():
        expected = trainer.model.encode(view)  # lr 1e-9: weights practically unchanged
    rows = trainer.method.bank.features[batch["index"]]
    torch.testing.assert_close(rows, expected, atol=1e-4, rtol=0)
    flips = [not torch.equal(view[i], batch["image"][i]) for i in range(len(view))]
    assert any(flips)  # flip-only augmentation: some views are mirrored ...
    for i, flipped in enumerate(flips):  # ... and each view is the image or its mirror image
        ref = torch.flip(batch["image"][i], dims=(-1,)) if flipped else batch["image"][i]
        assert torch.equal(view[i], ref)


def test_encoder_lr_scale_slows_or_freezes_the_encoder_only(split, cache, tmp_path):
    """``train.encoder_lr_scale``: the encoder's Adam group runs at lr x scale (0: frozen weights), the decoder
    at lr. Adam's step is ~lr per parameter whatever the gradient's size, so after the same steps the
    encoder moves ~scale times as far as at scale 1 (asserted below half of it at 0.1)."""
    moved = {}
    for scale in (1.0, 0.1, 0.0):
        cfg = _cfg("train.method=salad", f"train.encoder_lr_scale={scale}")
        train, val = _datasets(cfg, split, cache)
        trainer = Trainer(cfg, train, val, tmp_path / f"s{scale}")
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        if 0 < scale < 1:
            assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([0.002 * scale, 0.002])
        trainer.fit()
        end = trainer.model.state_dict()

        def change(prefixes, start=start, end=end):
            keys = [k for k in end if k.startswith(prefixes) and end[k].is_floating_point()
                    and "running_" not in k]
            return sum(float((end[k] - start[k]).abs().sum()) for k in keys) / sum(end[k].numel() for k in keys)

        moved[scale] = (change(trainer.model.encoder_prefixes), change(("decoder",)))
    assert moved[0.0][0] == 0.0 and moved[0.0][1] > 0  # frozen encoder, decoder trained
    assert 0 < moved[0.1][0] < 0.5 * moved[1.0][0]
    assert moved[0.1][1] > 0.5 * moved[1.0][1]  # the decoder keeps the full rate


def test_encoder_lr_scale_needs_an_auto_encoder(split, cache, tmp_path):
    cfg = _cfg("train.method=simclr", "train.encoder_lr_scale=0.5")
    train, val = _datasets(cfg, split, cache)
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        Trainer(cfg, train, val, tmp_path / "run")


@pytest.mark.parametrize("method", ["deep_svdd", "salad_no_rec"])
def test_encoder_lr_scale_zero_refuses_a_method_with_nothing_else_to_train(method, split, cache, tmp_path):
    cfg = _cfg(f"train.method={method}", "train.encoder_lr_scale=0")
    train, val = _datasets(cfg, split, cache)
    with pytest.raises(ConfigError, match="nothing would be trained"):
        Trainer(cfg, train, val, tmp_path / "run")
