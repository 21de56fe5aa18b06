"""Out-of-distribution guard: say so when an image is unlike anything the model was trained on.

A musculoskeletal model asked to score a chest film, a hip or a test pattern still returns a number;
that number means nothing. :class:`OODGuard` flags such inputs with two checks, fitted at model
selection and stored in the checkpoint:

1. **body part**: the input's body part (DICOM ``BodyPartExamined`` (0018,0015), or the manifest's
   ``body_part``) is mapped to a coarse region (chest, upper limb, lower limb, pelvis/hip, spine,
   head, abdomen; MURA's ``XR_*`` study types included) and compared with the regions of the training
   images. Unknown regions are never flagged on this ground; ``EXTREMITY`` matches either limb.
2. **embedding distance**: the cosine distance of the input's embedding to its nearest neighbour in a
   reference set of normal training embeddings (the memory bank for bank methods) is compared with the
   **largest** such distance among the validation normal images (a new normal image exceeds the largest
   of n validation normals with probability 1/(n+1)); beyond it, the image is flagged. The threshold
   never goes below :data:`MIN_DISTANCE` (an embedding that hardly varies between images, e.g. a DAE's,
   would otherwise flag float noise).

Example:
    >>> guard = OODGuard.fit(reference, val_normal_embeddings, ["XR_HUMERUS", "XR_FOREARM"])
    >>> guard.check(embeddings, ["CHEST", "HAND"])   # [(True, "body part CHEST ..."), (False, "")]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from salad_med.scoring.knn import KnnIndex

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer

__all__ = ["OODGuard", "body_region", "REGIONS", "MIN_DISTANCE"]

#: Smallest distance threshold (cosine distance 1e-3 is an angle of 2.6 degrees).
MIN_DISTANCE = 1e-3

#: coarse region of DICOM BodyPartExamined defined terms and MURA study types (upper case, no "XR_")
REGIONS: dict[str, str] = {
    **dict.fromkeys(("CHEST", "THORAX", "LUNG", "RIB", "RIBS", "STERNUM", "CXR", "BREAST"), "chest"),
    **dict.fromkeys(("HAND", "FINGER", "THUMB", "WRIST", "FOREARM", "ELBOW", "HUMERUS", "ARM", "UPPER_LIMB",
                     "UPPEREXTREMITY", "UPPER_EXTREMITY", "SHOULDER", "CLAVICLE", "SCAPULA", "ACJOINT"),
                    "upper_limb"),
    **dict.fromkeys(("FOOT", "TOE", "ANKLE", "LEG", "LOWER_LEG", "TIBIA", "FIBULA", "KNEE", "PATELLA", "FEMUR",
                     "THIGH", "LOWER_LIMB", "LOWEREXTREMITY", "LOWER_EXTREMITY", "HEEL", "CALCANEUS"),
                    "lower_limb"),
    **dict.fromkeys(("HIP", "PELVIS", "SACRUM", "COCCYX", "SIJOINT"), "pelvis_hip"),
    **dict.fromkeys(("SPINE", "CSPINE", "TSPINE", "LSPINE", "LSSPINE", "NECK"), "spine"),
    **dict.fromkeys(("SKULL", "HEAD", "FACE", "JAW", "TMJ", "SINUS", "ORBIT", "NOSE"), "head"),
    **dict.fromkeys(("ABDOMEN", "KUB"), "abdomen"),
    **dict.fromkeys(("EXTREMITY", "EXTREMITIES"), "extremity"),
}
_LIMBS = {"upper_limb", "lower_limb"}


def body_region(body_part: Any) -> str:
    """Coarse region of a body part name (``"unknown"`` when it cannot be told).

    Accepts DICOM defined terms (``"CHEST"``, ``"HAND"``), MURA study types (``"XR_HUMERUS"``) and
    FracAtlas-style names (``"hand"``, ``"mixed:leg+hip"``: the first part decides).
    """
    if body_part is None or (isinstance(body_part, float) and np.isnan(body_part)):
        return "unknown"
    text = str(body_part).strip().upper()
    text = re.sub(r"^(XR_|MIXED:)", "", text)
    text = re.split(r"[+/,;]", text)[0].strip().replace(" ", "_")
    return REGIONS.get(text, REGIONS.get(text.replace("_", ""), "unknown"))


def _regions_match(region: str, seen: set[str]) -> bool:
    if region == "unknown" or not seen - {"unknown"}:
        return True
    if region in seen:
        return True
    if region == "extremity":
        return bool(seen & (_LIMBS | {"pelvis_hip"}))
    return "extremity" in seen and region in _LIMBS | {"pelvis_hip"}


class OODGuard:
    """Body-part and embedding-distance checks fitted on the training/validation data.

    Args:
        reference: (R, D) embeddings of normal training images (unit rows after normalisation).
        threshold: the largest nearest-reference cosine distance among validation normals.
        regions: coarse regions of the training images.
        body_parts: the training body part names (for messages).
    """

    def __init__(self, reference: torch.Tensor, threshold: float, regions: Sequence[str],
                 body_parts: Sequence[str] = ()) -> None:
        self.reference = F.normalize(reference.detach().float().cpu(), dim=1).contiguous()
        self.threshold = float(threshold)
        self.regions = sorted(set(regions))
        self.body_parts = sorted({str(b) for b in body_parts})
        self._index = KnnIndex(self.reference, "auto")

    def nearest_distance(self, embeddings: torch.Tensor) -> np.ndarray:
        """(M, D) -> (M,) cosine distance to the nearest reference embedding."""
        q = F.normalize(embeddings.detach().float().cpu(), dim=1)
        sims, _ = self._index.search(q, 1)
        return (1.0 - sims[:, 0].double()).clamp_min(0.0).numpy()

    @classmethod
    def fit(cls, reference: torch.Tensor, val_normal: torch.Tensor, body_parts: Sequence[Any]) -> OODGuard:
        """Fit the distance threshold on the validation normals and record the training regions."""
        guard = cls(reference, 0.0, [body_region(b) for b in body_parts], [str(b) for b in body_parts])
        largest = float(guard.nearest_distance(val_normal).max()) if len(val_normal) else float("inf")
        guard.threshold = max(largest, MIN_DISTANCE)
        return guard

    @classmethod
    @torch.no_grad()
    def fit_for(cls, trainer: Trainer) -> OODGuard:
        """The guard of a trainer's current model: reference = the method's embeddings of normal training
        images (the bank rows for bank methods), threshold from the val normals."""
        from torch.utils.data import DataLoader

        from salad_med.data.dataset import ImagesOnly

        method, model = trainer.method, trainer.model
        model.eval()
        if method.has_bank and getattr(method, "bank", None) is not None:
            reference = method.bank.features.detach().cpu()[torch.from_numpy(~trainer.known_anomaly)]
        else:
            reference = trainer.train_features(method.ood_embedding, normal_only=True, limit=4096)
        normals = np.flatnonzero(np.asarray(trainer.val_ds.labels) == 0).tolist()
        loader = DataLoader(ImagesOnly(trainer.val_ds, normals), batch_size=64, shuffle=False)
        val = [method.ood_embedding(model, b["image"].to(trainer.device)).float().cpu() for b in loader]
        rows = trainer.train_ds.rows
        parts = rows["body_part"].tolist() if "body_part" in rows.columns else []
        return cls.fit(reference, torch.cat(val) if val else torch.zeros(0, reference.shape[1]), parts)

    def check(self, embeddings: torch.Tensor | None, body_parts: Sequence[Any] | None = None
              ) -> list[tuple[bool, str]]:
        """``(ood, reason)`` per image; ``reason`` is empty for in-distribution images.

        Args:
            embeddings: (M, D) or None (distance check skipped).
            body_parts: M body part names (DICOM BodyPartExamined / manifest), or None.
        """
        m = len(embeddings) if embeddings is not None else len(body_parts or [])
        reasons: list[list[str]] = [[] for _ in range(m)]
        seen = set(self.regions)
        if body_parts is not None:
            for i, part in enumerate(body_parts):
                region = body_region(part)
                if not _regions_match(region, seen):
                    trained = ", ".join(self.body_parts[:6]) or "unknown"
                    reasons[i].append(f"body part {str(part).strip() or '?'} ({region}) not seen in training "
                                      f"(trained on: {trained})")
        if embeddings is not None and len(embeddings):
            dist = self.nearest_distance(embeddings)
            for i, d in enumerate(dist):
                if d > self.threshold:
                    reasons[i].append(f"embedding distance {d:.3g} to the nearest training image exceeds the "
                                      f"largest among validation normals ({self.threshold:.3g})")
        return [(bool(r), "; ".join(r)) for r in reasons]

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors/numbers/strings (``weights_only`` safe)."""
        return {"reference": self.reference.clone(), "threshold": self.threshold, "regions": list(self.regions),
                "body_parts": list(self.body_parts)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OODGuard:
        """Restore :meth:`state_dict` output."""
        return cls(state["reference"], float(state["threshold"]), list(state["regions"]),
                   list(state.get("body_parts", [])))
