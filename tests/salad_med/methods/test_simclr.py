"""SimCLR: NT-Xent by hand, seeded views, training on 8- and 16-bit inputs, exact resume, export, pretrain CLI."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.checkpoint import read_checkpoint
from salad_med.engine.trainer import Trainer, train_from_manifest
from salad_med.evaluation.inference import load_run
from salad_med.methods.simclr import NTXentLoss, SimCLRParams, simclr_augmentation
from tests.conftest import TINY_OVERRIDES
from tests.salad_med.methods.conftest import Killed, kill_after_epoch, write_tiny_split_16bit

SIMCLR = [*TINY_OVERRIDES, "train.method=simclr", "train.pretrain_epochs=2", "train.rounds=0", "params.k=3"]


@pytest.fixture(scope="module")
def split16(tmp_path_factory):
    return write_tiny_split_16bit(tmp_path_factory.mktemp("simclr_data16"))


def test_nt_xent_by_hand():
    """Views a1=(1,0), a2=(0,1) and b1=(.6,.8), b2=(.8,.6); positives a1-b1, a2-b2, tau = 0.5.

    Cosines: a1.a2 = 0, a1.b1 = .6, a1.b2 = .8, a2.b1 = .8, a2.b2 = .6, b1.b2 = .96; s / tau doubles them.
    l(a1) = -log(e^1.2 / (e^0 + e^1.2 + e^1.6)) = l(a2) (same multiset of cosines);
    l(b1) = -log(e^1.2 / (e^1.2 + e^1.6 + e^1.92)) = l(b2); L = (2 l(a1) + 2 l(b1)) / 4.
    """
    e = math.exp
    la = -math.log(e(1.2) / (e(0.0) + e(1.2) + e(1.6)))
    lb = -math.log(e(1.2) / (e(1.2) + e(1.6) + e(1.92)))
    expected = (la + lb) / 2
    assert expected == pytest.approx(1.2707138, abs=1e-6)
    z_i = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_j = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    loss = NTXentLoss(temperature=0.5)(z_i, z_j)
    assert float(loss) == pytest.approx(expected, abs=1e-5)  # float32 exp/log
    # scale-free (cosine) and symmetric in the two views
    assert float(NTXentLoss(0.5)(3 * z_i, 0.5 * z_j)) == pytest.approx(expected, abs=1e-5)
    assert float(NTXentLoss(0.5)(z_j, z_i)) == pytest.approx(expected, abs=1e-5)
    # perfectly aligned positives, orthogonal negatives: l = -log(e^2 / (e^2 + 2 e^0))
    eye = torch.eye(2)
    assert float(NTXentLoss(0.5)(eye, eye)) == pytest.approx(-math.log(e(2) / (e(2) + 2)), abs=1e-5)


def test_views_are_seeded_one_channel_and_varied():
    aug = simclr_augmentation(32, SimCLRParams())
    x = torch.rand(1, 32, 32)
    aug.set_random_state(seed=7)
    a = torch.as_tensor(aug(x.clone()))
    aug.set_random_state(seed=7)
    b = torch.as_tensor(aug(x.clone()))
    aug.set_random_state(seed=8)
    c = torch.as_tensor(aug(x.clone()))
    assert a.shape == (1, 32, 32)
    assert torch.equal(a, b)  # same seed, same view: resume and workers draw identical views
    assert float((a - c).abs().mean()) > 1e-3


@pytest.mark.parametrize("bits", [8, 16])
def test_simclr_trains_scores_and_exports_on_8_and_16_bit(bits, split, split16, tmp_path):
    from salad_med.export import export_run

    manifest = split if bits == 8 else split16
    cfg = load_config("demo", [*SIMCLR, f"preprocess.bit_depth={bits}"])
    result = train_from_manifest(cfg, manifest, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["phase"].tolist() == ["simclr", "simclr"] and metrics["loss_nt_xent"].notna().all()
    # NT-Xent of N images lies in (0, log(2N - 1)] only if the views are told apart at all; random init
    # starts near log(2N - 1) (batch 8: log 15 = 2.71)
    assert 0 < metrics["loss_nt_xent"].iloc[0] < math.log(15) + 0.5
    run = load_run(tmp_path / "run")
    assert run.cache_dtype == np.dtype(np.uint16 if bits == 16 else np.uint8)
    ds = build_datasets(cfg, load_split_manifest(manifest), tmp_path / "run" / "cache")["val"]
    scores = run.score_dataset(ds)
    assert scores["raw_score"].nunique() > 1 and scores["score"].between(0, 1).all()
    assert result["best_val_auc"] == pytest.approx(read_checkpoint(tmp_path / "run" / "best.pt")["best_val_auc"])
    amap = run.anomaly_map(torch.rand(2, 1, 32, 32))  # an image-level method: the occlusion map of its score
    assert amap.shape == (2, 1, 32, 32) and torch.isfinite(amap).all()
    out = export_run(tmp_path / "run", "torchscript", tmp_path / "simclr.ts")  # checked against the run
    ts = torch.jit.load(str(out))
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(ts.raw(x).double(), run.raw_score_tensor(x), rtol=1e-4, atol=1e-7)  # RAW_RTOL


def test_simclr_resumes_exactly(split, tmp_path):
    cfg = load_config("demo", [*SIMCLR, "train.pretrain_epochs=3", "train.max_steps_per_epoch=2"])
    ds = build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")
    straight = Trainer(cfg, ds["train"], ds["val"], tmp_path / "a")
    straight.fit()
    ds = build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")
    killed = Trainer(cfg, ds["train"], ds["val"], tmp_path / "b", callbacks=[kill_after_epoch])
    with pytest.raises(Killed):
        killed.fit()
    torch.manual_seed(99)  # disturb the global RNG: the checkpoint restores it
    ds = build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")
    resumed = Trainer(cfg, ds["train"], ds["val"], tmp_path / "b", resume=True)
    assert resumed.epoch == 1
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("projector.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key  # same CPU, same ops, same views: bit-identical
    assert [r["loss_nt_xent"] for r in straight.history] == [r["loss_nt_xent"] for r in resumed.history]


def test_simclr_trains_encoder_and_head_only(split, tmp_path):
    cfg = load_config("demo", [*SIMCLR, "train.pretrain_epochs=1", "train.max_steps_per_epoch=1"])
    ds = build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")
    trainer = Trainer(cfg, ds["train"], ds["val"], tmp_path / "run")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    after = trainer.model.state_dict()
    changed = {k for k in after if after[k].is_floating_point() and not torch.equal(after[k], before[k])}
    assert any(k.startswith("net.encoder.") for k in changed) and any(k.startswith("projector.") for k in changed)
    assert not any(k.startswith(("net.decoder.", "net.unproject.", "net.head.")) for k in changed)
    assert ds["train"].views == 2  # SimCLR's pair, whatever train.augment_views says


def test_pretrain_cli(split, tmp_path):
    runner = CliRunner()
    args = ["pretrain", "--manifest", str(split), "--output", str(tmp_path / "enc"), "-c", "demo",
            *[a for o in [*SIMCLR[:-3], "train.pretrain_epochs=1"] for a in ("--set", o)]]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "enc" / "best.pt").is_file()
    assert read_checkpoint(tmp_path / "enc" / "best.pt")["config"]["train"]["method"] == "simclr"
    bad = runner.invoke(app, ["pretrain", "--method", "salad", "--manifest", str(split), "--output",
                              str(tmp_path / "x"), "-c", "demo"])
    assert bad.exit_code == 2 and "not a pre-training method" in bad.output and "simclr" in bad.output


def test_shipped_pretrain_preset_combines_with_a_data_config(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: [demo, simclr]\n")
    pre, demo = load_config(tmp_path / "mine.yaml"), load_config("demo")
    assert pre.train.method == "simclr" and pre.train.rounds == 0 and pre.params["tau"] == 0.2
    assert (pre.model, pre.data.image_size) == (demo.model, demo.data.image_size)  # usable as their teacher
