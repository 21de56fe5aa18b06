"""SPADE: kNN on the multi-scale features of a frozen teacher, for the image score and the anomaly map.

Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences", arXiv:2005.02357, 2020
(https://arxiv.org/abs/2005.02357; reference code https://github.com/byungjae89/SPADE-pytorch). SPADE
trains nothing: a pre-trained network's features of the normal training images are the model.

* **Image score** (paper Eq. 1): with ``f_y`` the test image's feature (here: the global average of each
  teacher pyramid level, concatenated, :func:`~salad_med.methods.components.teacher.pooled_pyramid`) and
  ``N_K(f_y)`` its K nearest normal training features, ``d(y) = 1/K sum_{f in N_K(f_y)} ||f - f_y||``
  (:class:`~salad_med.scoring.scorers.KNNScorer`, K = 50 as SPADE; lowered with a warning to the number
  of normal training images when there are fewer).
* **Anomaly map** (paper Eq. 2): for each pyramid level, the gallery is every pixel feature of the K
  nearest training images; each test pixel ``p`` scores ``d(y, p) = 1/kappa sum_{f in N_kappa(F(y, p))}
  ||f - F(y, p)||`` (kappa nearest gallery features; the reference code uses kappa = 1). Each level's map
  is upsampled (bilinear) to the image, the levels are averaged and the result smoothed with a Gaussian
  (sigma 4 px at 224 px in SPADE, scaled to ``data.image_size``).

The paper's pre-trained network is an ImageNet ResNet; here it is our SimCLR teacher, pre-trained on the
user's own radiographs (``params.teacher_run`` or inline, see
:mod:`salad_med.methods.components.teacher`), so SPADE runs offline on 1-channel 8/16-bit images. Every
search uses the project's kNN kernel (:class:`~salad_med.scoring.knn.KnnIndex`, faiss on CPU): Euclidean
nearest neighbours are found as maximum inner products of augmented vectors ``[q, 1] . [f, -||f||^2 / 2]
= q.f - ||f||^2 / 2`` (exact; distances then ``sqrt(||q||^2 - 2 (q.f - ||f||^2/2))`` in float32), the
image score itself by ``KNNScorer`` in float64. ``params.metric=cosine`` uses cosine distances instead.

For the map, the pixel pyramids of up to ``params.map_images`` normal training images (evenly spaced in
dataset order; all of them when there are fewer) are kept with the run, in float16; the K nearest are
searched among those. **Export** (TorchScript/ONNX) contains the image score (teacher, pooling, kNN head)
only; the map is computed by ``RunModel.anomaly_map`` / ``salad-med evaluate`` in Python.

Example:
    >>> cfg = load_config("demo", ["train.method=spade", "params.teacher_run=runs/simclr"])
    >>> train_from_manifest(cfg, "split.csv", "runs/spade")       # no gradient step: one fit
    >>> load_run("runs/spade").anomaly_map(x)                     # (B, 1, S, S)

See Also:
    :mod:`salad_med.methods.simclr` (the teacher's pre-training), :mod:`salad_med.scoring.knn`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salad_med.config import config_field as _field
from salad_med.methods.components.teacher import (
    FrozenEncoder,
    TeacherMethod,
    TeacherParams,
    clamp_k,
    pooled_pyramid,
)
from salad_med.methods.registry import register_method

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer

__all__ = ["Spade", "SpadeParams", "SpadeNet", "knn_distances", "SPADE_SIGMA_AT_224"]

#: SPADE's Gaussian smoothing of the map: sigma = 4 pixels on 224-pixel inputs.
SPADE_SIGMA_AT_224 = 4.0


@dataclass
class SpadeParams(TeacherParams):
    """``params`` of ``spade`` (the ``teacher_*`` keys: see :class:`TeacherParams`)."""

    k: int = _field(50, min=1, max=100000, help="K nearest normal training images (SPADE: 50; lowered with a "
                                                "warning to the number of normal training images)")
    kappa: int = _field(1, min=1, max=10000, help="kappa nearest gallery pixel features per map pixel (SPADE: 1)")
    levels: list[int] = _field([], help="teacher pyramid levels ([] = the network's: conv6 2,3,4; resnet18 1,2,3)")
    metric: str = _field("euclidean", choices=("euclidean", "cosine"), help="feature distance (SPADE: euclidean)")
    map_images: int = _field(256, min=0, max=100000, help="normal training images whose pixel pyramids are kept "
                                                          "for the anomaly maps (0 = no maps)")
    map_sigma: float = _field(SPADE_SIGMA_AT_224, min=0.0, max=64.0,
                              help="Gaussian smoothing of the map, pixels at 224 px (scaled to data.image_size)")


class SpadeNet(nn.Module):
    """SPADE's "network": the frozen teacher; ``forward(x (B, 1, S, S)) -> (B, sum_l C_l)`` pooled pyramid.

    ``encode`` is the teacher's unit embedding (the OOD guard's), ``teacher`` the
    :class:`~salad_med.methods.components.teacher.FrozenEncoder`.
    """

    def __init__(self, teacher: FrozenEncoder) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pooled_pyramid(self.teacher(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher.embed(x)

    def embedding_network(self) -> nn.Module:
        return self.teacher.net


def knn_distances(queries: torch.Tensor, keys: torch.Tensor, k: int, metric: str = "euclidean",
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest keys of each query with the project's kNN kernel, nearest first.

    ``euclidean``: maximum inner product of ``[q, 1]`` with ``[f, -||f||^2 / 2]`` (= ``q.f - ||f||^2 / 2``,
    largest for the nearest ``f``), distance ``sqrt(max(||q||^2 - 2 s, 0))``; ``cosine``: ``1 - cos`` of
    L2-normalised rows.

    Args:
        queries: (Q, C); keys: (N, C), on one device.
        k: neighbours, ``1 <= k <= N``.
        metric: ``"euclidean"`` or ``"cosine"``.
        backend: :class:`~salad_med.scoring.knn.KnnIndex` backend (faiss on CPU by default).

    Returns:
        ``(distances (Q, k) float32 ascending, indices (Q, k) int64)``.
    """
    from salad_med.scoring.knn import KnnIndex

    q, f = queries.float(), keys.float()
    if metric == "cosine":
        sims, idx = KnnIndex(F.normalize(f, dim=1).contiguous(), backend).search(F.normalize(q, dim=1), k)
        return (1.0 - sims).clamp_min(0.0), idx
    if metric != "euclidean":
        msg = f"metric {metric!r} is not one of ['euclidean', 'cosine']"
        raise ValueError(msg)
    keys_aug = torch.cat([f, -0.5 * f.square().sum(dim=1, keepdim=True)], dim=1).contiguous()
    q_aug = torch.cat([q, torch.ones_like(q[:, :1])], dim=1).contiguous()
    s, idx = KnnIndex(keys_aug, backend).search(q_aug, k)
    d2 = q.square().sum(dim=1, keepdim=True).to(s.device) - 2.0 * s
    return d2.clamp_min(0.0).sqrt(), idx


@register_method
class Spade(TeacherMethod):
    """kNN of pooled teacher features (image score) and of pixel features of the K nearest images (map)."""

    name = "spade"
    title = "SPADE: kNN on a frozen SimCLR teacher's pooled pyramid (image) and pixel pyramids (map)"
    paper = "Cohen & Hoshen, Sub-Image Anomaly Detection with Deep Pyramid Correspondences, 2020, " \
            "https://arxiv.org/abs/2005.02357"
    trains_network = False
    map_kind = "native"
    Params = SpadeParams

    def __init__(self, cfg, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self.k_used: int | None = None
        self._normals_checked: int | None = None  # normals count k_used was checked against (warn once)
        self.gallery: list[torch.Tensor] = []       # per level (G, C_l, H_l, W_l) float16
        self.gallery_keys: torch.Tensor | None = None  # (G, F) pooled features of the gallery images

    # ------------------------------------------------------------------ network
    def build_model(self) -> nn.Module:
        return SpadeNet(self.build_teacher())

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self._k_for(int((~np.asarray(trainer.known_anomaly, dtype=bool)).sum()))  # warn now, not after pre-training

    def _k_for(self, normals: int) -> int:
        """K for ``normals`` normal training images (:func:`clamp_k`, which warns once per count)."""
        if normals != self._normals_checked:
            self.k_used, self._normals_checked = clamp_k(self.params.k, normals), normals
        return int(self.k_used)

    # ------------------------------------------------------------------ image score
    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Pooled multi-scale teacher features (B, sum_l C_l)."""
        return model(x).float()

    def feature_module(self, model: nn.Module) -> nn.Module:
        return model

    def make_scorer(self):
        from salad_med.scoring.scorers import KNNScorer

        return KNNScorer(k=self.k_used or self.params.k, metric=self.params.metric, backend=self.cfg.score.backend)

    def fit_scorer(self, trainer: Trainer):
        """The kNN scorer on the normal training images' pooled features, and the map gallery."""
        from torch.utils.data import DataLoader

        from salad_med.data.dataset import ImagesOnly

        feats = trainer.train_features(self.features, normal_only=True)
        self._k_for(int(feats.shape[0]))
        scorer = self.make_scorer().fit(feats)
        self.gallery, self.gallery_keys = [], None
        n_map = min(int(self.params.map_images), int(feats.shape[0]))
        if n_map > 0:
            normal_rows = np.flatnonzero(~np.asarray(trainer.known_anomaly, dtype=bool))
            pick = np.unique(np.linspace(0, len(normal_rows) - 1, n_map).round().astype(np.int64))
            loader = DataLoader(ImagesOnly(trainer.train_ds, normal_rows[pick]), shuffle=False,
                                batch_size=max(2 * self.cfg.train.batch_size, 32),
                                num_workers=self.cfg.data.num_workers)
            teacher = self.teacher_of(trainer.model).eval()
            levels: list[list[torch.Tensor]] = [[] for _ in teacher.levels]
            for batch in loader:
                for store, f in zip(levels, teacher(batch["image"].to(trainer.device)), strict=True):
                    store.append(f.detach().to("cpu", torch.float16))
            self.gallery = [torch.cat(v) for v in levels]
            self.gallery_keys = feats[torch.from_numpy(pick)].float().contiguous()
        return scorer

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "k": self.k_used, "gallery": [g.clone() for g in self.gallery],
                "gallery_keys": None if self.gallery_keys is None else self.gallery_keys.clone()}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        super().load_state_dict(state, device)
        self.k_used = state.get("k")
        self.gallery = [g.cpu() for g in state.get("gallery") or []]
        keys = state.get("gallery_keys")
        self.gallery_keys = None if keys is None else keys.float().cpu()

    # ------------------------------------------------------------------ map
    @torch.no_grad()
    def anomaly_map(self, model: nn.Module, scorer, x: torch.Tensor) -> torch.Tensor | None:
        """SPADE's map (B, 1, S, S): per level, the mean distance of each pixel feature to its kappa nearest
        gallery pixel features of the K nearest gallery images, upsampled, averaged over levels, smoothed.
        Without a kept gallery (``params.map_images=0``) the default occlusion map of the image score."""
        if not self.gallery or self.gallery_keys is None:
            return super().anomaly_map(model, scorer, x)
        p, dev = self.params, x.device
        size = tuple(x.shape[-2:])
        pyramid = self.teacher_of(model)(x)
        k_img = min(self.k_used or p.k, int(self.gallery_keys.shape[0]))
        _, nearest = knn_distances(pooled_pyramid(pyramid), self.gallery_keys.to(dev), k_img, p.metric,
                                   self.cfg.score.backend)  # (B, K) gallery images
        maps = []
        for b in range(x.shape[0]):
            rows = nearest[b].cpu()
            per_level = []
            for feat, gallery in zip(pyramid, self.gallery, strict=True):
                c, h, w = feat.shape[1:]
                keys = gallery[rows].to(dev, torch.float32).permute(0, 2, 3, 1).reshape(-1, c)  # (K h w, C)
                queries = feat[b].float().permute(1, 2, 0).reshape(-1, c)  # (h w, C)
                d, _ = knn_distances(queries, keys, min(p.kappa, keys.shape[0]), p.metric, self.cfg.score.backend)
                level_map = d.mean(dim=1).view(1, 1, h, w).to(dev)  # Eq. 2
                per_level.append(F.interpolate(level_map, size=size, mode="bilinear", align_corners=False))
            maps.append(torch.stack(per_level).mean(dim=0))
        out = torch.cat(maps)
        sigma = p.map_sigma * size[-1] / 224.0
        if sigma > 0:
            from monai.networks.layers import GaussianFilter

            out = GaussianFilter(spatial_dims=2, sigma=sigma).to(dev)(out)
        return out.float()
