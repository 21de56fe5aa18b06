"""Uninformed Students: losses and the e / v score by hand, dense extraction = patch networks, the phases
inside the trainer's budget, 8/16-bit inputs with the network off, exact resume, export, the map on a
bright square, the random-teacher variants and `salad-med compare`."""

from __future__ import annotations

import copy
import socket
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.trainer import Trainer, train_from_manifest
from salad_med.errors import ConfigError
from salad_med.evaluation.inference import load_run
from salad_med.methods.students import (
    CompactnessLoss,
    KnowledgeDistillationLoss,
    PatchDescriptorNet,
    StudentRegressionLoss,
    crop_patches,
    default_patch_sizes,
    dilation_schedule,
    error_and_variance,
    normalised_score,
)
from tests.conftest import TINY_OVERRIDES
from tests.salad_med.methods.conftest import Killed, write_tiny_split_16bit

# E = 2 epochs (TINY: 1 + 1 x 1): 1 distillation epoch, 1 student epoch; a 1-epoch inline SimCLR teacher
STUDENTS = [*TINY_OVERRIDES, "train.method=students", "params.width=8", "params.descriptor_dim=8",
            "params.teacher_epochs=1", "params.teacher_batch_size=16"]


def _cfg(teachers, *extra):
    return load_config("demo", [*STUDENTS, f"params.teacher_cache={teachers}", *extra])


# ------------------------------------------------------------------ geometry
def test_patch_sizes_scale_the_papers_and_dense_extraction_equals_the_patch_network():
    assert default_patch_sizes(256) == (17, 33, 65)  # the paper's
    assert default_patch_sizes(128) == (9, 17, 33) and default_patch_sizes(64) == (5, 9, 17)
    assert default_patch_sizes(32) == (3, 5, 9)
    assert dilation_schedule(17) == [1, 1, 2, 4] and dilation_schedule(65) == [1, 1, 2, 4, 8, 16]
    assert dilation_schedule(7) == [1, 1, 1] and dilation_schedule(3) == [1]
    with pytest.raises(ValueError, match="odd"):
        dilation_schedule(8)

    torch.manual_seed(0)
    net = PatchDescriptorNet(9, width=4, dim=3, groups=2).double()
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    dense = net.dense(x)
    assert dense.shape == (2, 2, 3, 12, 12)
    # receptive field: output pixel (5, 6) depends on exactly the 9 x 9 window around it
    dense[0, :, :, 5, 6].sum().backward()
    support = x.grad[0, 0] != 0
    assert support[1:10, 2:11].all() and int(support.sum()) == 81
    # FDFE: the dense map at a pixel is the network applied to that pixel's p x p patch alone, borders
    # included (the same reflect padding)
    rows = torch.tensor([[0, 5, 11], [3, 11, 0]])
    cols = torch.tensor([[0, 6, 11], [11, 2, 7]])
    with torch.no_grad():
        patches = crop_patches(x, rows, cols, 9)
        assert patches.shape == (6, 1, 9, 9)
        per_patch = net(patches).view(2, 3, 2, 3)  # (B, n, G, d)
        expected = torch.stack([net.dense(x)[b, :, :, rows[b], cols[b]].permute(2, 0, 1) for b in range(2)])
    torch.testing.assert_close(per_patch, expected, rtol=1e-12, atol=1e-12)  # float64, same ops
    # params.student_crop: a window of the dense map is the whole map there, borders included
    with torch.no_grad():
        full = net.dense(x)
        for r0, c0, c in ((0, 0, 5), (7, 3, 5), (0, 0, 12), (11, 11, 1)):
            torch.testing.assert_close(net.dense(x, (r0, c0, c)), full[..., r0:r0 + c, c0:c0 + c],
                                       rtol=1e-12, atol=1e-12)  # float64: only the conv's summation order differs
    with pytest.raises(ValueError, match="does not fit"):
        net.dense(x, (8, 0, 5))


def test_students_of_one_module_are_independent_networks():
    torch.manual_seed(0)
    net = PatchDescriptorNet(5, width=4, dim=3, groups=3)
    net.dense(torch.rand(1, 1, 8, 8))[:, 1].sum().backward()  # student 1 only
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        per = conv.out_channels // 3
        grads = conv.weight.grad.view(3, per, -1).abs().sum(dim=(1, 2))
        assert grads[1] > 0 and grads[0] == 0 and grads[2] == 0  # other students' weights get nothing
        assert conv.bias.grad.view(3, per).abs().sum(dim=1).tolist()[::2] == [0.0, 0.0]


# ------------------------------------------------------------------ losses and scores by hand
def test_losses_by_hand():
    # Eq. (1): ||(1,2) - (0,0)||^2 = 5, ||(0,0) - (3,4)||^2 = 25 -> mean 15
    kd = KnowledgeDistillationLoss()(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert float(kd) == pytest.approx(15.0)
    # compactness: channels (1,2,3) and (2,4,5): deviations (-1,0,1), (-5/3,1/3,4/3), covariance 1,
    # variances 2/3 and 14/9 -> c = 1 / sqrt(2/3 * 14/9) = sqrt(27/28); mean over the 2 pairs of c^2 = 27/28
    lc = CompactnessLoss()
    assert float(lc(torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 5.0]]))) == pytest.approx(27 / 28, abs=1e-5)
    assert float(lc(torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]))) == pytest.approx(0, abs=1e-7)
    # anti-correlated channels are penalised too (the paper's signed sum would reward them with -2)
    assert float(lc(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))) == pytest.approx(1.0, abs=1e-5)
    # Eq. (6): M = 2 students, 1 x 2 pixels, d = 1, target (2, 2): student 1 (1, 2) -> (1 + 0) / 2 = 0.5,
    # student 2 (3, 0) -> (1 + 4) / 2 = 2.5; mean over the students 1.5
    students = torch.tensor([[1.0, 2.0], [3.0, 0.0]]).view(1, 2, 1, 1, 2)
    assert float(StudentRegressionLoss()(students, torch.tensor([2.0, 2.0]).view(1, 1, 1, 2))) == pytest.approx(1.5)


def test_error_and_variance_on_a_2x2_example():
    """M = 2 students, d = 2, a 2 x 2 map; per pixel (students; target) -> mean, e (Eq. 8), v (Eq. 9):
    (0,0): (1,0), (3,0); (0,0) -> (2,0), e = 4, v = (1 + 9)/2 - 4 = 1
    (0,1): (0,1), (0,1); (0,1) -> (0,1), e = 0, v = 0
    (1,0): (1,1), (-1,-1); (1,0) -> (0,0), e = 1, v = (2 + 2)/2 - 0 = 2
    (1,1): (2,2), (2,0); (0,0) -> (2,1), e = 5, v = (8 + 4)/2 - 5 = 1
    Eq. (10) with e_mu = 2, e_sigma = 2, v_mu = 1, v_sigma = 0.5: [[1 + 0, -1 - 2], [-0.5 + 2, 1.5 + 0]].
    """
    s1 = torch.tensor([[[1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [1.0, 2.0]]])  # (d, H, W)
    s2 = torch.tensor([[[3.0, 0.0], [-1.0, 2.0]], [[0.0, 1.0], [-1.0, 0.0]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    e, v = error_and_variance(torch.stack([s1, s2])[None], target[None])
    torch.testing.assert_close(e[0], torch.tensor([[4.0, 0.0], [1.0, 5.0]]))
    torch.testing.assert_close(v[0], torch.tensor([[1.0, 0.0], [2.0, 1.0]]))
    score = normalised_score(e, v, torch.tensor([2.0, 2.0]), torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(score[0], torch.tensor([[1.0, -3.0], [1.5, 1.5]]))


# ------------------------------------------------------------------ runs
def _refuse_network(monkeypatch) -> list[str]:
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[1:] or kwargs)[:80])
        msg = "network disabled by the test"
        raise OSError(msg)

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                        (urllib.request, "urlopen"), (torch.hub, "download_url_to_file"),
                        (torch.hub, "load_state_dict_from_url")):
        monkeypatch.setattr(owner, name, refuse)
    with pytest.raises(OSError, match="network disabled"):  # the patch is live
        urllib.request.urlopen("https://example.org")
    attempts.clear()
    return attempts


def _direct_map(run, x: torch.Tensor) -> torch.Tensor:
    """Eq. (6)-(11) recomputed in float64 from the run's sub-networks and statistics."""
    from monai.networks.layers import GaussianFilter

    net = run.model
    maps = []
    with torch.no_grad():
        for i, (desc, students) in enumerate(zip(net.descriptors, net.students, strict=True)):
            p = desc.patch_size // 2
            xp = F.pad(x, (p, p, p, p), mode="reflect").double()
            desc, students = copy.deepcopy(desc).double(), copy.deepcopy(students).double()
            y = desc(xp)  # valid convolutions over the padded image: (B, d, S, S)
            y = (y - net.descriptor_mean[i].double().view(1, -1, 1, 1)) / net.descriptor_std[i].double().view(1, -1, 1, 1)
            s = students(xp).view(x.shape[0], net.num_students, net.dim, *x.shape[-2:])
            mu = s.mean(dim=1)
            e = (mu - y).square().sum(dim=1)
            v = (s.square().sum(dim=2).mean(dim=1) - mu.square().sum(dim=1))  # Eq. (9) as the paper writes it
            (em, es), (vm, vs) = net.error_stats[i].double(), net.variance_stats[i].double()
            maps.append((e - em) / es + (v - vm) / vs)
    m = torch.stack(maps).mean(dim=0)[:, None].float()
    return GaussianFilter(2, sigma=4.0 * x.shape[-1] / 256)(F.pad(m, (8, 8, 8, 8), mode="replicate"))[..., 8:-8, 8:-8]


@pytest.mark.parametrize("bits", [8, 16])
def test_students_train_score_map_and_export_on_8_and_16_bit_offline(bits, split, teachers, tmp_path, monkeypatch):
    from salad_med.export import export_run

    attempts = _refuse_network(monkeypatch)
    manifest = split if bits == 8 else write_tiny_split_16bit(tmp_path / "data16")
    cfg = _cfg(teachers, f"preprocess.bit_depth={bits}")
    train_from_manifest(cfg, manifest, tmp_path / "run")
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["phase"].tolist() == ["distill", "students"]
    # the distillation epoch trains T^ only and is not validated (no students to score with yet)
    first, last = metrics.iloc[0], metrics.iloc[1]
    assert first["loss_distill"] > 0 and 0 < first["loss_compact"] <= 1 and first["loss_student"] == 0
    assert np.isnan(first["val_auc"]) and not first["best"]
    assert last["loss_student"] > 0 and last["loss_distill"] == 0 and np.isfinite(last["val_auc"])
    run = load_run(tmp_path / "run")
    assert run.cache_dtype == np.dtype(np.uint16 if bits == 16 else np.uint8)
    assert run.method.teacher_info["source"] == "inline" and bool(run.model.teacher.loaded)
    assert run.method.patch_sizes == (3, 5, 9) and run.model.students[0].groups == 3  # 32 px, M = 3
    assert bool(run.model.descriptor_stats_ready) and bool(run.model.score_stats_ready)
    ds = build_datasets(cfg, load_split_manifest(manifest), tmp_path / "run" / "cache")["val"]
    scores = run.score_dataset(ds)
    assert scores["raw_score"].nunique() == len(scores) and scores["score"].between(0, 1).all()
    x = torch.stack([ds.image(i) for i in range(3)])
    m = run.anomaly_map(x)
    assert m.shape == (3, 1, 32, 32) and torch.isfinite(m).all()
    # image score = max of the smoothed map
    torch.testing.assert_close(run.raw_score_tensor(x), m.flatten(1).amax(dim=1).double(), rtol=1e-6, atol=0)
    if bits == 8:  # the whole chain against a float64 recomputation (float32 convolutions: 1e-4 of the scale)
        direct = _direct_map(run, x)
        torch.testing.assert_close(m, direct, rtol=0, atol=1e-4 * float(direct.abs().max()))
    out = export_run(tmp_path / "run", "torchscript", tmp_path / "students.ts")  # checked against the run
    x = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(out)).raw(x).double(), run.raw_score_tensor(x),
                               rtol=1e-4, atol=0)  # export.RAW_RTOL
    if bits == 8 and _has("onnx") and _has("onnxruntime"):  # ONNX too (fixed-shape smoothing convolutions)
        import onnxruntime

        onnx_path = export_run(tmp_path / "run", "onnx", tmp_path / "students.onnx")
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        raw = session.run(["raw_score"], {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(np.asarray(raw, np.float64).ravel(), run.raw_score_tensor(x).numpy(),
                                   rtol=1e-4)  # export.RAW_RTOL: float32 kernels of two runtimes
    assert attempts == []


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _kill_after(n: int):
    def callback(_trainer, row) -> None:
        if row["epoch"] == n:
            raise Killed

    return callback


@pytest.mark.parametrize("crop", [0, 16], ids=["whole-image", "student-crop"])
def test_students_resume_exactly_across_and_within_the_phases(crop, split, teachers, tmp_path):
    # E = 4: 1 distillation epoch (round(0.3 x 4)), 3 student epochs; killed at the phase boundary and inside.
    # With params.student_crop the window of each student step is drawn from the checkpointed generator too.
    cfg = _cfg(teachers, "train.pretrain_epochs=3", "train.max_steps_per_epoch=2", f"params.student_crop={crop}")

    def trainer(name, **kw):
        ds = build_datasets(cfg, load_split_manifest(split), tmp_path / "cache")
        return Trainer(cfg, ds["train"], ds["val"], tmp_path / name, **kw)

    straight = trainer("a")
    straight.fit()
    assert [r["phase"] for r in straight.history] == ["distill", "students", "students", "students"]
    for kill in (1, 2):
        with pytest.raises(Killed):
            trainer(f"k{kill}", callbacks=[_kill_after(kill)]).fit()
        torch.manual_seed(99)  # disturb the global RNG: the checkpoint restores it
        resumed = trainer(f"k{kill}", resume=True)
        assert resumed.epoch == kill
        before = {k: v.clone() for k, v in resumed.model.state_dict().items()}
        resumed.fit()
        a, b = straight.model.state_dict(), resumed.model.state_dict()
        assert a.keys() == b.keys()
        # Tolerance: both runs execute the same float32 ops on the same CPU with the same patch draws, so
        # they normally agree bit for bit; 1e-6 relative (a few float32 ulps, ~1e-7) only absorbs a
        # different summation order inside a multithreaded CPU kernel. One missed, repeated or differently
        # drawn step moves the weights by ~lr x grad = 1e-4 relative or more (checked below), far outside it.
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-8, msg=lambda m, k=key, at=kill: f"{at} {k}: {m}")
        np.testing.assert_allclose([r["loss_total"] for r in resumed.history],
                                   [r["loss_total"] for r in straight.history], rtol=1e-6)
        np.testing.assert_allclose([r["val_auc"] for r in resumed.history[1:]],
                                   [r["val_auc"] for r in straight.history[1:]], rtol=0, atol=1e-9)
        # the tolerance can fail: the resumed run's weights at the kill differ from the final ones by far more
        drift = max(float((before[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
                    for k in a if k.startswith("students."))
        assert drift > 1e-4, drift


def test_map_finds_a_bright_square(split, teachers, tmp_path):
    cfg = _cfg(teachers, "train.pretrain_epochs=5", "train.lr=0.005")  # 2 distillation + 4 student epochs
    train_from_manifest(cfg, split, tmp_path / "run")
    run = load_run(tmp_path / "run")
    val = build_datasets(cfg, load_split_manifest(split), tmp_path / "run" / "cache")["val"]
    normal = [i for i in range(len(val)) if val.labels[i] == 0][0]
    x = val.image(normal).clone()[None]
    x[..., 4:12, 20:28] = 1.0  # an 8x8 bright square far from the central blob
    m = run.anomaly_map(x)[0, 0]
    r, c = divmod(int(m.argmax()), 32)
    assert 2 <= r <= 13 and 18 <= c <= 29, (r, c)  # the hottest pixel is on the square (+- 2 px)
    inside, outside = m[4:12, 20:28].mean(), m[20:, :12].mean()
    assert float(inside) > float(outside) + 3.0  # in normalised e + v units (standard deviations)
    assert float(run.raw_score_tensor(x)) > float(run.raw_score_tensor(val.image(normal)[None]))


def test_random_teacher_variants_pretrain_nothing(split, tmp_path):
    cache = tmp_path / "tc"
    train_from_manifest(_cfg(cache, "params.teacher_init=random"), split, tmp_path / "random_p")
    run = load_run(tmp_path / "random_p")
    assert run.method.teacher_info == {"source": "random"} and not bool(run.model.teacher.loaded)
    # no distillation at all: the students regress a random T^ from the first epoch
    train_from_manifest(_cfg(cache, "params.distill_fraction=0"), split, tmp_path / "no_distill")
    metrics = pd.read_csv(tmp_path / "no_distill" / "metrics.csv")
    assert metrics["phase"].tolist() == ["students", "students"] and metrics["val_auc"].notna().all()
    assert not (cache / "teachers").exists()  # SimCLR was never pre-trained


def test_refusals(split, tmp_path):
    with pytest.raises(ConfigError, match=r"params.patch_sizes=\[3, 4\]: \[4\] not odd"):
        train_from_manifest(_cfg(tmp_path, "params.patch_sizes=[3,4]"), split, tmp_path / "r1")
    with pytest.raises(ConfigError, match=r"\[33\] not odd or not in \[3, data.image_size=32\]"):
        train_from_manifest(_cfg(tmp_path, "params.patch_sizes=[33]"), split, tmp_path / "r2")
    with pytest.raises(ConfigError, match="1 epoch.* leave none for the students"):
        train_from_manifest(_cfg(tmp_path, "train.rounds=0"), split, tmp_path / "r3")
    with pytest.raises(ConfigError, match="model.init_from is for auto-encoder methods"):
        train_from_manifest(_cfg(tmp_path, f"model.init_from={tmp_path}"), split, tmp_path / "r4")


def test_compare_accepts_students(split, teachers, tmp_path):
    from typer.testing import CliRunner

    from salad_med.cli.app import app

    sets = [*STUDENTS, f"params.teacher_cache={teachers}"]
    res = CliRunner().invoke(app, ["compare", "-m", str(split), "-o", str(tmp_path / "cmp"), "-c", "demo",
                                   "--methods", "students", "--seeds", "0", "--n-boot", "10",
                                   *[a for s in sets for a in ("--set", s)]])
    assert res.exit_code == 0, res.output
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    assert runs["method"].tolist() == ["students"] and runs["test_auc"].between(0, 1).all()
    assert runs["best_epoch"].tolist() == [2]  # the distillation epoch is never selected
