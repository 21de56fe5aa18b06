"""Reverse Distillation++ and plain RD: the four loss terms by hand and against geomloss, the simplex-noise
pseudo-anomalies, the map and score against a direct computation, 8/16-bit runs, exact resume, export,
rd = rdpp without its terms, compare."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.trainer import Trainer, train_from_manifest
from salad_med.evaluation.inference import load_run
from salad_med.methods.base import TrainBatch
from salad_med.methods.rdpp import (
    RdppParams,
    contrast_loss,
    derangement,
    distance_maps,
    fractal_simplex_noise,
    kd_loss,
    pseudo_anomalies,
    recon_loss,
    simplex_noise_2d,
    sinkhorn_divergence,
    ssot_loss,
)
from tests.conftest import TINY_OVERRIDES
from tests.salad_med.methods.conftest import Killed, kill_after_epoch, write_tiny_split_16bit

TEACHER = ["params.teacher_epochs=2", "params.teacher_batch_size=16"]


def _sets(method: str, teachers, *extra: str) -> list[str]:
    return [*TINY_OVERRIDES, f"train.method={method}", *TEACHER, f"params.teacher_cache={teachers}", *extra]


@pytest.fixture(scope="module")
def rdpp_run(split, teachers, tmp_path_factory):
    run = tmp_path_factory.mktemp("rdpp_run") / "run"
    train_from_manifest(load_config("demo", _sets("rdpp", teachers)), split, run)
    return run


# ------------------------------------------------------------------------------------------------ losses
def _map(pixels) -> torch.Tensor:
    """[(c0, c1) per pixel, row-major over a 2x2 grid] -> (1, 2, 2, 2)."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, 2, 2, 2)


def test_kd_loss_and_maps_by_hand():
    t = _map([(1, 0), (0, 1), (1, 1), (1, 0)])
    s = _map([(1, 0), (1, 0), (1, -1), (0, 1)])
    # per pixel: cos = 1, 0, 0, 0 -> 1 - cos = 0, 1, 1, 1 (RD's Eq. 2 and its map)
    torch.testing.assert_close(distance_maps([t], [s])[0], torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]]))
    torch.testing.assert_close(kd_loss([t], [s], "pixel"), torch.tensor(0.75))
    # flattened: t = (1,0,1,1 | 0,1,1,0), s = (1,1,1,0 | 0,0,-1,1): t.s = 2 - 1 = 1, |t|^2 = |s|^2 = 5
    torch.testing.assert_close(kd_loss([t], [s], "flat"), torch.tensor(1 - 1 / 5))
    # a sum over levels, a mean over the batch (the second image is distilled perfectly)
    tt, ss = torch.cat([t, t]), torch.cat([s, t])
    torch.testing.assert_close(kd_loss([tt, tt], [ss, ss], "flat"), torch.tensor(2 * 0.8 / 2))
    with pytest.raises(ValueError, match="mode"):
        kd_loss([t], [s], "l2")


def test_ssot_by_hand_and_against_geomloss():
    # single-pixel maps are Dirac measures: the de-biased Sinkhorn divergence is then exactly the ground
    # cost |a - b|^2 / 2 (the only plan; OT(a, a) = 0). softmax(0, 0) = (1/2, 1/2), softmax(ln 3, 0) = (3/4, 1/4)
    f = torch.zeros(2, 2, 1, 1)
    f[1, 0] = math.log(3.0)
    expected = (2 * 0.25**2) / 2
    torch.testing.assert_close(ssot_loss([f], torch.tensor([1, 0])), torch.tensor(expected))
    # 1/K over the levels: a level of identical images adds 0 (de-biased), halving the mean
    torch.testing.assert_close(ssot_loss([f, torch.zeros(2, 3, 2, 2)], torch.tensor([1, 0])),
                               torch.tensor(expected / 2))
    # multi-pixel clouds: the batched estimate = geomloss called on each pair alone, with the pixels of an
    # image as the points of its cloud (softmax over the channels)
    from geomloss import SamplesLoss

    gen = torch.Generator().manual_seed(0)
    levels = [torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 5, 2, 2, generator=gen)]
    partner = torch.tensor([2, 0, 1])
    plain = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.9, debias=True)
    direct = np.mean([np.mean([float(plain(torch.softmax(p[i], 0).flatten(1).T, torch.softmax(p[j], 0).flatten(1).T))
                               for i, j in enumerate(partner.tolist())]) for p in levels])
    got = ssot_loss(levels, partner, sinkhorn_divergence(0.05, 0.9))
    # the two differ only by the annealing's start (diameter sqrt 2 here, the data's extent there): both
    # converge to the same divergence, to ~1e-4 of its value at eps = 0.0025
    torch.testing.assert_close(got, torch.tensor(direct, dtype=torch.float32), rtol=2e-3, atol=1e-6)
    assert float(got) > 0
    # a larger map is average-pooled to max_points pixels before the transport
    big = torch.randn(2, 3, 8, 8, generator=gen)
    pooled = F.adaptive_avg_pool2d(big, (4, 4))
    torch.testing.assert_close(ssot_loss([big], torch.tensor([1, 0]), max_points=16),
                               ssot_loss([pooled], torch.tensor([1, 0])))


def test_recon_and_contrast_by_hand():
    def px(*v):
        return torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)

    # L_Recon = 1 - cos: orthogonal -> 1, 45 degrees -> 1 - 1/sqrt 2; mean over K = 2 levels
    torch.testing.assert_close(recon_loss([px(1, 0), px(1, 0)], [px(0, 1), px(1, 1)]),
                               torch.tensor((1 + 1 - 2**-0.5) / 2))
    # L_Con = max(0, cos - margin): cos 0 at margin -0.5 -> 0.5; cos -1 -> 0; cos 1/sqrt 2 at margin 0.5
    torch.testing.assert_close(contrast_loss([px(1, 0)], [px(0, 1)], -0.5), torch.tensor(0.5))
    torch.testing.assert_close(contrast_loss([px(1, 0)], [px(-2, 0)], -0.5), torch.tensor(0.0))
    torch.testing.assert_close(contrast_loss([px(1, 0), px(1, 0)], [px(1, 1), px(-1, 0)], 0.5),
                               torch.tensor((2**-0.5 - 0.5) / 2))


def test_derangement_pairs_every_image_with_another():
    seen = set()
    for seed in range(40):
        for n in (2, 3, 5):
            pi = derangement(n, torch.Generator().manual_seed(seed))
            assert sorted(pi.tolist()) == list(range(n)) and all(pi[i] != i for i in range(n))
            if n == 3:
                seen.add(tuple(pi.tolist()))
    assert seen == {(1, 2, 0), (2, 0, 1)}  # both derangements of 3 are drawn


# ------------------------------------------------------------------------------------------------ noise
def test_simplex_noise_is_zero_at_lattice_corners_smooth_and_bounded():
    g2 = (3 - math.sqrt(3)) / 6
    i, j = torch.meshgrid(torch.arange(-3.0, 4.0, dtype=torch.float64), torch.arange(-3.0, 4.0, dtype=torch.float64),
                          indexing="ij")
    # the corners of the triangle grid, unskewed to the plane (float64: a float32 corner is ~1e-7 off it,
    # which the gradient term turns into ~1e-6): the corner's own term has d = 0, its neighbours are
    # sqrt(2/3) away, beyond the kernel's radius sqrt(1/2)
    corners = simplex_noise_2d(i - (i + j) * g2, j - (i + j) * g2)
    torch.testing.assert_close(corners, torch.zeros_like(corners), atol=1e-12, rtol=0)
    x, y = torch.meshgrid(torch.linspace(0, 8, 401), torch.linspace(0, 8, 401), indexing="ij")
    n = simplex_noise_2d(x, y)
    assert float(n.abs().max()) <= 1.0 and float(n.std()) > 0.1  # the 70x scaling keeps it in [-1, 1]
    # continuous (no jump where the triangle changes): Lipschitz on fine lines. Each of the 3 corner terms
    # (0.5 - d^2)^4 (g . d) has a slope of at most |g| max|d/dd (0.5 - d^2)^4 d| = sqrt 2 / 16: 70 x 3 x that
    t = torch.linspace(0, 8, 8001, dtype=torch.float64)
    c = torch.full_like(t, 0.37)
    bound = 70 * 3 * math.sqrt(2) / 16
    for line in (simplex_noise_2d(t, c), simplex_noise_2d(c, t), simplex_noise_2d(t, t * 0.5 + 0.1)):
        assert float(line.diff().abs().max()) / 0.001 <= bound
    a = fractal_simplex_noise(12, 20, (3.0, 7.0))
    assert a.shape == (12, 20) and a.dtype == torch.float32 and float(a.abs().max()) <= 1.0
    torch.testing.assert_close(a, fractal_simplex_noise(12, 20, (3.0, 7.0)), rtol=0, atol=0)
    assert not torch.allclose(a, fractal_simplex_noise(12, 20, (4.0, 7.0)))


def test_pseudo_anomalies_add_noise_in_one_seeded_box():
    p = RdppParams(noise_min=0.125, noise_max=0.25, noise_amplitude=0.2)
    x = torch.full((3, 1, 32, 32), 0.5)
    out = pseudo_anomalies(x, [11, 12, 11], p)
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)  # same seed, same noise, whatever the batch
    assert not torch.equal(out[0], out[1])
    for b in range(2):
        changed = (out[b, 0] != 0.5).nonzero()
        rows, cols = changed[:, 0], changed[:, 1]
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        assert 4 <= h <= 8 and 4 <= w <= 8  # sides in [0.125, 0.25] x 32 pixels
        assert float((out[b] - 0.5).abs().max()) <= 0.2 + 1e-6
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    torch.testing.assert_close(pseudo_anomalies(x[1:2], [12], p), out[1:2], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ runs
def test_map_and_score_are_rd_inference(rdpp_run):
    from monai.networks.layers import GaussianFilter

    run = load_run(rdpp_run)
    assert run.map_kinds[0] == "native"
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    net = run.model
    with torch.no_grad():
        f = net.teacher(x)
        s = net.student(net.project(f))
    total = torch.zeros(3, 1, 32, 32, dtype=torch.float64)
    for t, d in zip(f, s, strict=True):
        t, d = t.double(), d.double()
        cos = (t * d).sum(1) / (t.norm(dim=1) * d.norm(dim=1))
        total += F.interpolate((1 - cos)[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    direct = GaussianFilter(2, sigma=4.0 * 32 / 256)(total.float())  # RD's sigma 4 at 256 px
    got = run.anomaly_map(x)
    assert got.shape == (3, 1, 32, 32)
    # float32 cosines against float64 ones: ~1e-6 relative
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.raw_score_tensor(x), got.flatten(1).amax(1).double(), rtol=1e-6, atol=0)
    assert len(f) == 3 and {tuple(m.shape[-2:]) for m in f} == {(8, 8), (4, 4), (2, 2)}  # conv6 blocks 2,3,4


def test_a_bright_square_raises_the_map_there_and_the_score(rdpp_run, split):
    run = load_run(rdpp_run)
    val = build_datasets(run.cfg, load_split_manifest(split), rdpp_run / "cache")["val"]
    normal = val.image([i for i in range(len(val)) if val.labels[i] == 0][0])[None]
    x = normal.clone()
    x[..., 4:12, 20:28] = 1.0  # an 8x8 bright square far from the central blob
    m = run.anomaly_map(x)[0, 0]
    # two tiny epochs do not localise sharply (the hottest pixel is not always inside), but the square's
    # area is clearly hotter than a far normal area, and the image score (the map's maximum) rises
    assert float(m[4:12, 20:28].mean()) > 1.2 * float(m[20:, :12].mean())
    assert float(run.raw_score_tensor(x)[0]) > float(run.raw_score_tensor(normal)[0])


def test_rdpp_trains_every_term_and_keeps_the_teacher_frozen(rdpp_run, teachers):
    history = pd.read_csv(rdpp_run / "metrics.csv")
    for key in ("kd", "ssot", "recon", "con"):
        assert (history[f"loss_{key}"] > 0).all(), key
    run = load_run(rdpp_run)
    assert run.method.teacher_info["source"] == "inline"
    teacher = load_run(run.method.teacher_info["run_dir"])
    for key, value in teacher.model.net.state_dict().items():
        assert torch.equal(run.model.teacher.net.state_dict()[key], value), key
    trainable = {id(p) for p in run.method.trainable_parameters(run.model)}
    assert not any(id(p) in trainable for p in run.model.teacher.parameters())
    assert len(run.model.projections) == 3  # phi_k after each of the K = 3 teacher blocks


def test_known_anomalies_are_left_out_of_the_loss(rdpp_run):
    run = load_run(rdpp_run)
    method, net = run.method, run.model
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 1, 32, 32, generator=gen)
    views = pseudo_anomalies(x, [1, 2, 3], method.params)[:, None]
    method._known = np.array([True, False, False])
    with torch.no_grad():
        three = method.training_loss(None, TrainBatch(x, torch.tensor([0, 1, 2]), views), net(x, views))
        method._known = np.array([False, False, False])
        two = method.training_loss(None, TrainBatch(x[1:], torch.tensor([1, 2]), views[1:]),
                                   net(x[1:], views[1:]))
    # two normals: the only derangement pairs them with each other, whatever the seed
    for key in ("total", "kd", "ssot", "recon", "con"):
        torch.testing.assert_close(three[key], two[key], rtol=1e-5, atol=1e-7)
        assert float(two[key].detach()) > 0


def test_rd_is_rdpp_without_its_terms(split, teachers, tmp_path):
    train_from_manifest(load_config("demo", _sets("rd", teachers)), split, tmp_path / "rd")
    train_from_manifest(load_config("demo", _sets("rdpp", teachers, "params.alpha=0", "params.beta=0",
                                                   "params.gamma=0", "params.projection=false")),
                        split, tmp_path / "rdpp0")
    a, b = load_run(tmp_path / "rd"), load_run(tmp_path / "rdpp0")
    assert list(a.method.loss_keys) == ["kd"] and len(a.model.projections) == 0
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key  # same ops in the same order on one CPU: bit-identical


def test_rdpp_resumes_exactly(split, teachers, tmp_path):
    cfg = load_config("demo", _sets("rdpp", teachers, "train.max_steps_per_epoch=2"))

    def datasets():
        ds = build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")
        return ds["train"], ds["val"]

    straight = Trainer(cfg, *datasets(), tmp_path / "a")
    straight.fit()
    with pytest.raises(Killed):
        Trainer(cfg, *datasets(), tmp_path / "b", callbacks=[kill_after_epoch]).fit()
    torch.manual_seed(99)  # disturb the global RNG: the checkpoint restores it
    resumed = Trainer(cfg, *datasets(), tmp_path / "b", resume=True)
    assert resumed.epoch == 1
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    # the pseudo-anomalies and Sinkhorn pairs are seeded by (seed, epoch, rows), never by the global
    # stream, and the same CPU runs the same float ops: the weights are bit-identical, not merely close
    for key in a:
        assert torch.equal(a[key], b[key]), key
    cols = ["epoch", "loss_total", "loss_kd", "loss_ssot", "loss_recon", "loss_con", "val_auc"]
    pd.testing.assert_frame_equal(pd.DataFrame(straight.history)[cols], pd.DataFrame(resumed.history)[cols])


@pytest.mark.parametrize("bits", [8, 16])
def test_rdpp_with_a_teacher_run_on_8_and_16_bit_scores_and_exports(bits, split, tmp_path):
    from salad_med.export import export_run

    manifest = split if bits == 8 else write_tiny_split_16bit(tmp_path / "data16")
    base = [*TINY_OVERRIDES, f"preprocess.bit_depth={bits}", "train.max_steps_per_epoch=1"]
    train_from_manifest(load_config("demo", [*base, "train.method=simclr", "train.rounds=0", "params.k=3"]),
                        manifest, tmp_path / "simclr")
    cfg = load_config("demo", [*base, "train.method=rdpp", f"params.teacher_run={tmp_path / 'simclr'}"])
    train_from_manifest(cfg, manifest, tmp_path / "rdpp")
    run = load_run(tmp_path / "rdpp")
    assert run.cache_dtype == np.dtype(np.uint16 if bits == 16 else np.uint8)
    assert run.method.teacher_info["source"] == "teacher_run"
    ds = build_datasets(cfg, load_split_manifest(manifest), tmp_path / "rdpp" / "cache")["val"]
    scores = run.score_dataset(ds)
    assert scores["raw_score"].nunique() > 1 and scores["score"].between(0, 1).all()
    out = export_run(tmp_path / "rdpp", "torchscript", tmp_path / "rdpp.ts")  # teacher..map..max, whole
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(out)).raw(x).double(), run.raw_score_tensor(x),
                               rtol=1e-4, atol=0)  # export.RAW_RTOL
    if bits == 16:  # ONNX too (the map's smoothing is a fixed-kernel convolution); onnxruntime checks it
        pytest.importorskip("onnx")
        assert export_run(tmp_path / "rdpp", "onnx", tmp_path / "rdpp.onnx").is_file()


def test_compare_and_evaluate_run_rd_and_rdpp(split, tmp_path):
    from typer.testing import CliRunner

    from salad_med.cli.app import app
    from salad_med.evaluation.evaluate import evaluate_run

    sets = [*TINY_OVERRIDES, "train.rounds=0", "train.max_steps_per_epoch=1", "params.teacher_batch_size=16"]
    res = CliRunner().invoke(app, ["compare", "-m", str(split), "-o", str(tmp_path / "cmp"), "-c", "demo",
                                   "--methods", "rd,rdpp", "--seeds", "0", "--n-boot", "10",
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert sorted(runs["method"]) == ["rd", "rdpp"] and runs["test_auc"].between(0, 1).all()
    teachers = [p for p in (tmp_path / "cmp" / "cache" / "teachers").iterdir() if p.is_dir()]
    assert len(teachers) == 1  # rd and rdpp distil one shared SimCLR teacher
    run_dir = next(p.parent for p in (tmp_path / "cmp").rglob("best.pt") if "teachers" not in p.parts
                   and load_run(p.parent).cfg.train.method == "rdpp")
    metrics = evaluate_run(run_dir, n_boot=10, plots=False, report=False)
    assert 0 <= metrics["auc"] <= 1
