"""SPADE: the kNN kernel by hand, Eq. 1 and Eq. 2 against direct float64 computations, teacher sources,
caching, resume, 8/16-bit inputs, export and self-contained runs."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from salad_med.config import load_config
from salad_med.data.dataset import SaladDataset, build_datasets, load_split_manifest
from salad_med.engine.trainer import Trainer, train_from_manifest
from salad_med.errors import ConfigError
from salad_med.evaluation.inference import load_run
from salad_med.methods.components.teacher import pooled_pyramid, pretrain_teacher, teacher_config
from salad_med.methods.spade import SpadeParams, knn_distances
from tests.conftest import TINY_OVERRIDES
from tests.salad_med.methods.conftest import Killed, kill_after_epoch, write_tiny_split_16bit

TEACHER = ["params.teacher_epochs=2", "params.teacher_batch_size=16"]
SPADE = [*TINY_OVERRIDES, "train.method=spade", "params.k=5", *TEACHER]


@pytest.fixture(scope="module")
def spade_run(split, cache, tmp_path_factory):
    """A SPADE run with an inline (cached) SimCLR teacher."""
    run = tmp_path_factory.mktemp("spade_run") / "run"
    train_from_manifest(load_config("demo", [*SPADE, f"data.cache_dir={cache}"]), split, run)
    return run


def test_knn_distances_by_hand():
    keys = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0], [10.0, 10.0]])
    q = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    d, idx = knn_distances(q, keys, 3)
    # |(0,0)-(1,0)| = 1, -(0,2) = 2, -(3,4) = 5; |(1,1)-(1,0)| = 1, -(0,2) = sqrt 2, -(3,4) = sqrt 13
    torch.testing.assert_close(d, torch.tensor([[1.0, 2.0, 5.0], [1.0, 2**0.5, 13**0.5]]), atol=1e-5, rtol=0)
    assert idx.tolist() == [[1, 2, 0], [1, 2, 0]]
    d, idx = knn_distances(torch.tensor([[1.0, 1.0]]), keys, 2, metric="cosine")
    # cos((1,1), (10,10)) = 1; cos((1,1), (3,4)) = 7 / (5 sqrt 2)
    torch.testing.assert_close(d, torch.tensor([[0.0, 1 - 7 / (5 * 2**0.5)]]), atol=1e-6, rtol=0)
    assert idx.tolist() == [[3, 0]]
    with pytest.raises(ValueError, match="metric"):
        knn_distances(q, keys, 1, metric="manhattan")


def test_pooled_pyramid_by_hand():
    a = torch.arange(8.0).view(1, 2, 2, 2)  # channel 0: 0..3 (mean 1.5), channel 1: 4..7 (mean 5.5)
    b = torch.ones(1, 1, 1, 1) * 3
    torch.testing.assert_close(pooled_pyramid([a, b]), torch.tensor([[1.5, 5.5, 3.0]]))


def _train_images(cfg, split, cache):
    ds = build_datasets(cfg, load_split_manifest(split), cache)
    train, val = ds["train"], ds["val"]
    normal = np.flatnonzero(~train.known_anomaly)
    return train, val, torch.stack([train.image(i) for i in normal])


def test_image_score_is_eq1_and_map_is_eq2(spade_run, split, cache):
    run = load_run(spade_run)
    cfg = run.cfg
    train, val, x_train = _train_images(cfg, split, cache)
    x = torch.stack([val.image(i) for i in range(4)])
    with torch.no_grad():
        f_train, f = run.model(x_train).double(), run.model(x).double()
    k = run.method.k_used
    assert k == 5
    # Eq. 1: mean Euclidean distance to the K nearest normal training images, float64
    expected = torch.cdist(f, f_train).topk(k, dim=1, largest=False).values.mean(dim=1)
    torch.testing.assert_close(run.raw_score_tensor(x), expected, rtol=1e-6, atol=0)  # float32 features
    # Eq. 2 by a direct float64 computation over the gallery (all 15 normals are kept: map_images=256)
    gallery = run.method.gallery
    assert len(gallery) == 3 and gallery[0].shape[0] == x_train.shape[0] and gallery[0].dtype == torch.float16
    with torch.no_grad():
        pyr = run.model.teacher(x)
    nearest = torch.cdist(f, run.method.gallery_keys.double()).topk(k, dim=1, largest=False).indices
    maps = []
    for b in range(x.shape[0]):
        levels = []
        for feat, gal in zip(pyr, gallery, strict=True):
            c, h, w = feat.shape[1:]
            keys = gal[nearest[b]].double().permute(0, 2, 3, 1).reshape(-1, c)
            q = feat[b].double().permute(1, 2, 0).reshape(-1, c)
            d = torch.cdist(q, keys).min(dim=1).values.view(1, 1, h, w)  # kappa = 1
            levels.append(F.interpolate(d.float(), size=(32, 32), mode="bilinear", align_corners=False))
        maps.append(torch.stack(levels).mean(0))
    from monai.networks.layers import GaussianFilter

    direct = GaussianFilter(2, sigma=4.0 * 32 / 224)(torch.cat(maps))
    got = run.anomaly_map(x)
    assert got.shape == (4, 1, 32, 32) and torch.isfinite(got).all()
    # the kernel's squared distances come from float32 inner products (||q||^2 - 2 (q.f - ||f||^2 / 2)):
    # cancellation leaves ~1e-6 of ||q||^2; 1e-3 of the map's scale is far above that and far below a signal
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-3 * float(direct.abs().max()))


def test_map_finds_a_bright_square(spade_run, split, cache):
    run = load_run(spade_run)
    _, val, _ = _train_images(run.cfg, split, cache)
    normal = [i for i in range(len(val)) if val.labels[i] == 0][0]
    x = val.image(normal).clone()[None]
    x[..., 4:12, 20:28] = 1.0  # an 8x8 bright square far from the central blob
    m = run.anomaly_map(x)[0, 0]
    r, c = divmod(int(m.argmax()), 32)
    assert 0 <= r <= 16 and 16 <= c <= 31, (r, c)  # the hottest pixel is at the square's quadrant
    inside, outside = m[4:12, 20:28].mean(), m[20:, :12].mean()
    assert float(inside) > 2 * float(outside)


def test_inline_teacher_is_cached_shared_and_the_run_self_contained(spade_run, split, cache, tmp_path):
    teachers = cache / "teachers"
    finished = [p for p in teachers.iterdir() if p.is_dir() and not p.name.endswith(".partial")]
    assert len(finished) == 1 and (finished[0] / "best.pt").is_file()
    first = load_run(spade_run)
    assert first.method.teacher_info["source"] == "inline"
    assert first.method.teacher_info["run_dir"] == str(finished[0].resolve())
    # another seed on the same split reuses the teacher (no second pre-training)
    cfg = load_config("demo", [*SPADE, f"data.cache_dir={cache}", "seed=3"])
    train_from_manifest(cfg, split, tmp_path / "seed3")
    assert sorted(p.name for p in teachers.iterdir() if p.is_dir()) == [finished[0].name]
    other = load_run(tmp_path / "seed3")
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, other.model.state_dict()[key]), key
    # the teacher's weights are in the run: scoring and maps work without the teacher folder
    moved = tmp_path / "moved"
    shutil.move(str(finished[0]), moved)
    try:
        again = load_run(spade_run)
        x = torch.rand(2, 1, 32, 32)
        torch.testing.assert_close(again.raw_score_tensor(x), first.raw_score_tensor(x))
        assert again.anomaly_map(x).shape == (2, 1, 32, 32)
    finally:
        shutil.move(str(moved), finished[0])


def test_interrupted_teacher_pretraining_resumes_exactly(split, tmp_path):
    cfg = load_config("demo", [*SPADE, "params.teacher_epochs=3"])
    params = SpadeParams(**cfg.params)
    train, val, _ = _train_images(cfg, split, tmp_path / "cache")
    whole = pretrain_teacher(cfg, params, train, val, tmp_path / "a")
    # the same teacher killed after its first epoch, then asked for again: it resumes from <key>.partial
    tcfg = teacher_config(cfg, params)
    partial = tmp_path / "b" / "teachers" / f"{whole.name}.partial"
    views = SaladDataset(train.rows, train.cache, train.cache_rows, "train", seed=tcfg.seed)
    with pytest.raises(Killed):
        Trainer(tcfg, views, val, partial, callbacks=[kill_after_epoch]).fit()
    state = torch.get_rng_state()
    resumed = pretrain_teacher(cfg, params, train, val, tmp_path / "b")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert resumed.name == whole.name and not partial.exists()
    assert pd.read_csv(resumed / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    a, b = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (whole, resumed))
    for key in a:
        assert torch.equal(a[key], b[key]), key  # CPU, same ops and views: bit-identical


@pytest.mark.parametrize("bits", [8, 16])
def test_spade_with_a_teacher_run_on_8_and_16_bit(bits, split, tmp_path):
    from salad_med.export import export_run

    manifest = split if bits == 8 else write_tiny_split_16bit(tmp_path / "data16")
    base = [*TINY_OVERRIDES, f"preprocess.bit_depth={bits}"]
    train_from_manifest(load_config("demo", [*base, "train.method=simclr", "train.pretrain_epochs=1",
                                              "train.rounds=0", "params.k=3"]), manifest, tmp_path / "simclr")
    cfg = load_config("demo", [*base, "train.method=spade", "params.k=4", f"params.teacher_run={tmp_path / 'simclr'}"])
    train_from_manifest(cfg, manifest, tmp_path / "spade")
    assert not (tmp_path / "spade" / "cache" / "teachers").exists()  # nothing pre-trained inline
    run, teacher = load_run(tmp_path / "spade"), load_run(tmp_path / "simclr")
    assert run.cache_dtype == np.dtype(np.uint16 if bits == 16 else np.uint8)
    assert run.method.teacher_info["source"] == "teacher_run"
    for key, value in teacher.model.net.state_dict().items():
        assert torch.equal(run.model.teacher.net.state_dict()[key], value), key
    assert bool(run.model.teacher.loaded) and not any(p.requires_grad for p in run.model.parameters())
    ds = build_datasets(cfg, load_split_manifest(manifest), tmp_path / "spade" / "cache")["val"]
    scores = run.score_dataset(ds)
    assert scores["raw_score"].nunique() > 1
    out = export_run(tmp_path / "spade", "torchscript", tmp_path / "spade.ts")  # image score only
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(out)).raw(x).double(), run.raw_score_tensor(x),
                               rtol=1e-4, atol=0)  # export.RAW_RTOL
    # a teacher of another network is refused with the keys to set
    bad = load_config("demo", [*base, "train.method=spade", "model.base_channels=8",
                               f"params.teacher_run={tmp_path / 'simclr'}"])
    with pytest.raises(ConfigError, match=r"model\.base_channels: 4 there, 8 here.*--set model\.base_channels=4"):
        train_from_manifest(bad, manifest, tmp_path / "bad")
    missing = load_config("demo", [*base, "train.method=spade", f"params.teacher_run={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="params.teacher_run=.*nope.*not found"):
        train_from_manifest(missing, manifest, tmp_path / "bad2")


def test_resume_of_a_finished_run_changes_nothing(spade_run, split, cache):
    before = load_run(spade_run)
    cfg = load_config("demo", [*SPADE, f"data.cache_dir={cache}"])
    out = train_from_manifest(cfg, split, spade_run, resume=True)
    assert out["steps"] == 0
    after = load_run(spade_run)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(after.raw_score_tensor(x), before.raw_score_tensor(x), rtol=0, atol=0)


def test_refusals(split, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from is for auto-encoder methods"):
        train_from_manifest(load_config("demo", [*SPADE, f"model.init_from={tmp_path}"]), split, tmp_path / "r")
    with pytest.raises(ConfigError, match="params.levels"):
        train_from_manifest(load_config("demo", [*SPADE, "params.levels=[3,9]"]), split, tmp_path / "r2")
    # K above the normal training images: lowered with a warning, the score still ranks the images
    with pytest.warns(RuntimeWarning, match="params.k=500 exceeds the 15 normal training images: using K=15"):
        train_from_manifest(load_config("demo", [*SPADE, "params.k=500", "params.map_images=0",
                                                 f"params.teacher_cache={tmp_path / 'tc'}"]), split, tmp_path / "r3")
    run = load_run(tmp_path / "r3")
    assert run.method.k_used == 15
    # no gallery kept (map_images=0): the map falls back to the occlusion map of the image score
    amap = run.anomaly_map(torch.rand(1, 1, 32, 32))
    assert amap.shape == (1, 1, 32, 32) and torch.isfinite(amap).all()


def test_compare_runs_simclr_and_spade_with_one_shared_teacher(split, tmp_path):
    from typer.testing import CliRunner

    from salad_med.cli.app import app

    # one config for every method: spade's teacher takes the run's budget (teacher_epochs=0 -> 1 epoch)
    sets = [*TINY_OVERRIDES, "train.pretrain_epochs=1", "train.rounds=0"]
    res = CliRunner().invoke(app, ["compare", "-m", str(split), "-o", str(tmp_path / "cmp"), "-c", "demo",
                                   "--methods", "simclr,spade", "--seeds", "0,1", "--n-boot", "10",
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert sorted(zip(runs["method"], runs["seed"], strict=True)) == [("simclr", 0), ("simclr", 1), ("spade", 0),
                                                                        ("spade", 1)]
    assert runs["test_auc"].between(0, 1).all()
    teachers = [p.name for p in (tmp_path / "cmp" / "cache" / "teachers").iterdir() if p.is_dir()]
    assert len(teachers) == 1  # both spade seeds used one inline teacher
    metrics = pd.read_csv(tmp_path / "cmp" / "cache" / "teachers" / teachers[0] / "metrics.csv")
    assert metrics["epoch"].tolist() == [1]  # the run's budget
