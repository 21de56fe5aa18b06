"""Out-of-distribution guard: body regions and nearest-embedding distance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from salad_med.scoring.ood import MIN_DISTANCE, OODGuard, body_region


@pytest.mark.parametrize(("name", "region"), [
    ("CHEST", "chest"), ("XR_HUMERUS", "upper_limb"), ("hand", "upper_limb"), ("mixed:leg+hip", "lower_limb"),
    ("HIP", "pelvis_hip"), ("EXTREMITY", "extremity"), ("", "unknown"), (None, "unknown"), ("UNKNOWN", "unknown"),
    ("Lower Leg", "lower_limb"), ("XR_FINGER", "upper_limb"),
])
def test_body_region(name, region):
    assert body_region(name) == region


def _cluster(n, d, seed, centre):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(centre + 0.05 * torch.randn(n, d, generator=gen), dim=1)


def test_guard_flags_other_body_parts_and_far_embeddings(tmp_path):
    centre = F.normalize(torch.ones(1, 8), dim=1)
    guard = OODGuard.fit(_cluster(200, 8, 0, centre), _cluster(50, 8, 1, centre), ["XR_HUMERUS", "XR_FOREARM"])
    assert guard.threshold >= MIN_DISTANCE
    near, far = _cluster(3, 8, 2, centre), F.normalize(-centre.repeat(2, 1) + 0.05 * torch.randn(2, 8), dim=1)
    out = guard.check(torch.cat([near, far]), ["HAND", "", "CHEST", "EXTREMITY", "XR_ELBOW"])
    flags = [flag for flag, _ in out]
    assert flags == [False, False, True, True, True]
    assert "CHEST (chest) not seen in training" in out[2][1] and "embedding distance" in out[3][1]
    assert out[0][1] == "" and "body part" not in out[3][1]  # EXTREMITY matches a limb model
    again = OODGuard.from_state(torch.load(_save(guard, tmp_path), weights_only=True))
    assert again.check(near, None) == guard.check(near, None)


def _save(guard, tmp_path):
    torch.save(guard.state_dict(), tmp_path / "ood.pt")
    return tmp_path / "ood.pt"


def test_unknown_training_regions_never_flag_body_parts():
    ref = F.normalize(torch.randn(20, 4), dim=1)
    guard = OODGuard.fit(ref, ref[:5], ["UNKNOWN"] * 20)
    assert guard.check(None, ["CHEST", "SKULL"]) == [(False, ""), (False, "")]
