"""The CUDA path of the trainer and the scorer: mixed precision, channels-last, exact resume, GPU vs CPU scores.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with
``pytest tests/salad_med/engine/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from salad_med.config import load_config
from salad_med.data.dataset import build_datasets, load_split_manifest
from salad_med.engine.trainer import Trainer
from salad_med.evaluation.inference import load_run
from tests.conftest import TINY_OVERRIDES, Killed, kill_after_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cfg(*extra):
    return load_config("demo", [*TINY_OVERRIDES, "model.arch=conv6", "train.max_steps_per_epoch=2",
                                "train.augment_views=1", *extra])


def _datasets(cfg, split, cache):
    ds = build_datasets(cfg, load_split_manifest(split), cache)
    return ds["train"], ds["val"]


def _max_diff(a: Trainer, b: Trainer) -> float:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    d = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if sa[k].numel())
    return max(d, float((a.method.bank.features - b.method.bank.features).abs().max()))


@pytest.mark.parametrize("amp", [True, False])
def test_cuda_training_uses_amp_channels_last_and_resumes_like_a_rerun(amp, split, cache, tmp_path):
    cfg = _cfg("train.device=cuda", f"train.amp={str(amp).lower()}")
    train, val = _datasets(cfg, split, cache)
    straight = Trainer(cfg, train, val, tmp_path / "a")
    assert straight.device.type == "cuda"
    assert straight.amp_dtype == (torch.bfloat16 if amp else None)
    conv = next(m for m in straight.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    straight.fit()
    assert all(np.isfinite(r["loss_total"]) and 0.0 <= r["val_auc"] <= 1.0 for r in straight.history)
    rerun = Trainer(cfg, train, val, tmp_path / "c")
    rerun.fit()

    killed = Trainer(cfg, train, val, tmp_path / "b", callbacks=[kill_after_epoch])
    with pytest.raises(Killed):
        killed.fit()
    torch.manual_seed(1234)  # disturb the global RNGs (CPU and CUDA): the checkpoint restores them
    torch.cuda.manual_seed_all(1234)
    resumed = Trainer(cfg, train, val, tmp_path / "b", resume=True)
    assert resumed.epoch == 1
    resumed.fit()
    # deterministic cuDNN (train.deterministic, the default): a resumed run must be as close to the
    # uninterrupted one as a plain rerun is (0 when the GPU's kernels are deterministic)
    rerun_gap, resume_gap = _max_diff(straight, rerun), _max_diff(straight, resumed)
    print(f"amp={amp}: rerun max |diff| {rerun_gap:.3g}, resume max |diff| {resume_gap:.3g}")
    assert resume_gap <= rerun_gap


def test_gpu_scores_match_cpu_scores(split, cache, tmp_path):
    """A run trained on the GPU scores the same images on CPU and GPU alike: the Eq. 4 score goes through
    float64 on both; the network's float32 convolutions differ by cuDNN vs oneDNN rounding (and TF32 on
    Ampere or newer: 10-bit mantissa, ~1e-3 relative per product) -> agreement 1e-2 relative on the score,
    and the ranking (AUC) within 0.02."""
    from salad_med.evaluation.metrics import auc

    cfg = _cfg("train.device=cuda", "train.amp=true")
    train, val = _datasets(cfg, split, cache)
    Trainer(cfg, train, val, tmp_path / "run").fit()
    test = build_datasets(cfg, load_split_manifest(split), cache, ("test",))["test"]
    on_cpu = load_run(tmp_path / "run", device="cpu").score_dataset(test)
    on_gpu = load_run(tmp_path / "run", device="cuda").score_dataset(test)
    a, b = on_cpu["raw_score"].to_numpy(), on_gpu["raw_score"].to_numpy()
    np.testing.assert_allclose(b, a, rtol=1e-2, atol=1e-6)
    labels = on_cpu["label"].to_numpy().astype(int)
    if 0 < labels.sum() < len(labels):
        assert abs(auc(labels, a) - auc(labels, b)) <= 0.02
