"""SimCLR: contrastive pre-training of our encoders on the user's own radiographs, offline.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020, http://proceedings.mlr.press/v119/chen20j.html (official code:
https://github.com/google-research/simclr). Each training image ``x_k`` gives two views ``x_2k-1 = t(x_k)``,
``x_2k = t'(x_k)`` (``t, t'`` drawn from :func:`simclr_augmentation`: random resized crop, small rotation,
intensity scale/shift and gamma, Gaussian blur and noise; no colour operation, the images have one
channel). The encoder ``f`` (``conv6`` / ``resnet18`` of :mod:`salad_med.nets`, before L2 normalisation)
gives ``h = f(x)`` (B, D); a 2-layer projection head ``g`` (Linear-ReLU-Linear) gives ``z = g(h)``. The
loss is NT-Xent (:class:`NTXentLoss`, MONAI's :class:`~monai.losses.ContrastiveLoss`) with temperature
``tau`` over the 2N views of a batch, the other 2(N-1) views being the negatives.

As an anomaly detector its score is the mean distance of the test image's representation ``h`` to
those of its ``params.k`` nearest normal training images (:class:`~salad_med.scoring.scorers.KNNScorer`):
Euclidean by default (exact, float64), or cosine (``params.metric=cosine``, faiss). Euclidean, because
the unit embeddings of our encoders start nearly collinear (cosine distances ~1e-6 at initialisation,
where float32 inner products leave only noise); ``h`` keeps that variation measurable. Mainly, its run is a **pre-trained encoder**: ``salad-med pretrain --method simclr`` writes one, and
``params.teacher_run: RUN`` makes it the frozen teacher of SPADE (and the other teacher methods),
``model.init_from: RUN`` the initial encoder of SALAD or any auto-encoder method. Nothing is downloaded.

Views are drawn by the train dataset (in DataLoader workers) from seeds ``(seed, epoch, index, view)``:
a resumed run draws exactly the views of an uninterrupted one, whatever the number of workers or ranks.
Under ``torchrun`` the negatives of a step are those of the rank's local batch.

Example:
    >>> cfg = load_config("demo", ["train.method=simclr", "params.tau=0.2"])
    >>> train_from_manifest(cfg, "split.csv", "runs/simclr")     # = salad-med pretrain --method simclr

See Also:
    :mod:`salad_med.methods.components.teacher` (the teacher API), :mod:`salad_med.methods.spade`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from salad_med.config import config_field as _field
from salad_med.methods.base import AnomalyMethod
from salad_med.methods.components.teacher import clamp_k
from salad_med.methods.registry import register_method

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer

__all__ = ["SimCLR", "SimCLRParams", "SimCLRNet", "SimCLRForward", "ProjectionHead", "NTXentLoss", "Representation",
           "simclr_augmentation", "attach_views", "N_VIEWS"]

#: Views per image (SimCLR's pair).
N_VIEWS = 2


@dataclass
class SimCLRParams:
    """``params`` of ``simclr``."""

    tau: float = _field(0.2, min=0.02, max=10.0,
                        help="NT-Xent temperature (SimCLR: 0.1-0.5; below 0.02 exp(1/tau) overflows float32)")
    proj_hidden: int = _field(256, min=4, max=8192, help="projection head hidden width")
    proj_dim: int = _field(128, min=2, max=4096, help="projection head output size (SimCLR: 128)")
    k: int = _field(5, min=1, max=100000, help="nearest normal training images of the kNN anomaly score")
    metric: str = _field("euclidean", choices=("euclidean", "cosine"),
                         help="kNN distance on the representation h (cosine: of h / ||h||, the unit embedding)")
    crop_scale: float = _field(0.9, min=0.1, max=1.0,
                               help="random resized crop: smallest crop side, as a fraction of the image side "
                                    "(mild: radiographs are positioned; 0.6 measured worse on the phantoms)")
    rotate_deg: float = _field(5.0, min=0.0, max=45.0, help="largest rotation, degrees")
    gamma: float = _field(0.3, min=0.0, max=0.9, help="gamma drawn in [1 - gamma, 1 + gamma]")
    intensity: float = _field(0.1, min=0.0, max=0.5, help="intensity scale +-intensity and shift +-intensity")
    blur_sigma: float = _field(1.0, min=0.0, max=16.0, help="largest Gaussian blur sigma, pixels at 64 px "
                                                            "(scaled with data.image_size)")
    noise_std: float = _field(0.02, min=0.0, max=0.5, help="largest Gaussian noise standard deviation")


def simclr_augmentation(image_size: int, params: SimCLRParams | None = None):
    """SimCLR's view distribution for a (1, S, S) image in [0, 1], as MONAI random transforms.

    Random resized crop and rotation as one affine resampling (MONAI ``RandAffine``, bilinear, zero
    padding): each axis zoomed by ``1 / c`` with ``c`` in ``[crop_scale, 1]`` (a crop of side ``c S``:
    scale and aspect change), shifted by up to ``(1 - crop_scale) S / 4`` pixels and rotated by up to
    ``rotate_deg``; then intensity scale and shift by up to ``intensity`` (p = 0.8 each), gamma in
    ``[1 - gamma, 1 + gamma]`` (p = 0.8), Gaussian blur with sigma up to ``blur_sigma * S / 64``
    (p = 0.5) and Gaussian noise with std up to ``noise_std`` (p = 0.5). No colour operation. The dataset
    clips the result to [0, 1]. Seed with ``set_random_state``.
    """
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    p = params or SimCLRParams()
    shift = (1.0 - p.crop_scale) * image_size / 4.0
    steps = [RandAffine(prob=1.0, rotate_range=(math.radians(p.rotate_deg),),
                        scale_range=((p.crop_scale - 1.0, 0.0), (p.crop_scale - 1.0, 0.0)),
                        translate_range=(shift, shift), padding_mode="zeros", mode="bilinear")]
    if p.intensity > 0:
        steps += [RandScaleIntensity(factors=p.intensity, prob=0.8), RandShiftIntensity(offsets=p.intensity, prob=0.8)]
    if p.gamma > 0:
        steps.append(RandAdjustContrast(prob=0.8, gamma=(1.0 - p.gamma, 1.0 + p.gamma)))
    sigma = p.blur_sigma * image_size / 64.0
    if sigma > 0:
        steps.append(RandGaussianSmooth(sigma_x=(0.1, max(sigma, 0.1)), sigma_y=(0.1, max(sigma, 0.1)), prob=0.5))
    if p.noise_std > 0:
        steps.append(RandGaussianNoise(prob=0.5, std=p.noise_std))
    return Compose(steps)


def attach_views(dataset, n_views: int, transform) -> None:
    """Make a :class:`~salad_med.data.dataset.SaladDataset` serve ``n_views`` views per item drawn by
    ``transform`` (seeded by the dataset from ``(seed, epoch, index, view)``), in place.

    Raises:
        TypeError: ``dataset`` is not a SaladDataset.
    """
    from salad_med.data.dataset import SaladDataset

    if not isinstance(dataset, SaladDataset):
        msg = f"SimCLR's views are drawn by a SaladDataset, got {type(dataset).__name__}"
        raise TypeError(msg)
    dataset.views = int(n_views)
    dataset._augment = transform  # the dataset's view transform (it seeds and clips every draw)


class NTXentLoss(nn.Module):
    """NT-Xent, SimCLR's Eq. 1, computed by MONAI's :class:`~monai.losses.ContrastiveLoss`.

    Steps: stack the 2N projections ``[z_i; z_j]`` -> cosine similarities ``s_ab`` of all pairs ->
    for each view ``a`` with positive ``p(a)``:
    ``l(a) = -log( exp(s_a,p(a) / tau) / sum_{b != a} exp(s_ab / tau) )`` -> mean over the 2N views
    (``L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``). MONAI's implementation is exactly this: its
    denominator sums over every ``b != a``, the positive included, as in the paper. Computed in float32
    (``exp(1 / tau)`` must not overflow: ``tau >= 0.02``).

    Args:
        temperature: tau.

    Shapes:
        z_i, z_j: (N, P) projections of the two views of N images -> scalar.

    References:
        Chen et al., ICML 2020, Eq. 1; official code https://github.com/google-research/simclr
        (``objective.py``, ``add_contrastive_loss``).
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        from monai.losses import ContrastiveLoss

        self.temperature = float(temperature)
        self.loss = ContrastiveLoss(temperature=self.temperature)

    def forward(self, z_i: torch.Tensor, z_j: torch.Tensor) -> torch.Tensor:
        return self.loss(z_i.float(), z_j.float())


class ProjectionHead(nn.Sequential):
    """SimCLR's ``g``: Linear(D, hidden) -> ReLU -> Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


class SimCLRNet(nn.Module):
    """An embedding auto-encoder ``net`` (the encoder ``f``; its decoder is unused) and the projection head.

    ``forward(x (B, 1, S, S)) -> (h (B, D) before normalisation, z (B, P))``; ``encode`` / ``decode`` /
    ``feature_pyramid`` are the network's (``encode`` = ``h / ||h||``).
    ``state_dict`` keys: ``net.*`` (those of the network alone, prefixed) and ``projector.*``.
    """

    def __init__(self, net: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.projector = projector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net.encoder_features(x)
        return h, self.projector(h)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.net.decode(z)

    def feature_pyramid(self, x: torch.Tensor, levels=None) -> list[torch.Tensor]:
        return self.net.feature_pyramid(x, levels)

    def embedding_network(self) -> nn.Module:
        """The pre-trained network (teacher / ``model.init_from`` source)."""
        return self.net


class Representation(nn.Module):
    """``x (B, 1, S, S) -> h (B, D)``: SimCLR's representation (the encoder before L2 normalisation), the
    kNN score's features (export)."""

    def __init__(self, model: SimCLRNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.net.encoder_features(x).float()


class SimCLRForward(nn.Module):
    """The training forward: ``(x, views (B, V >= 2, 1, S, S)) -> (z_i (B, P), z_j (B, P))`` of views 0
    and 1, both encoded in one pass (the module DDP wraps)."""

    def __init__(self, model: SimCLRNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if views is None or views.ndim != 5 or views.shape[1] < N_VIEWS:
            got = None if views is None else tuple(views.shape)
            msg = f"SimCLR needs {N_VIEWS} views per image, (B, {N_VIEWS}, 1, S, S); got {got}"
            raise ValueError(msg)
        b = x.shape[0]
        _, z = self.model(torch.cat([views[:, 0], views[:, 1]]))
        return z[:b], z[b:]


@register_method
class SimCLR(AnomalyMethod):
    """Contrastive pre-training (NT-Xent over two views); score = kNN on the encoder representation."""

    name = "simclr"
    title = "SimCLR: contrastive pre-training (NT-Xent, 2 views); score = kNN distance on its representation"
    paper = "Chen, Kornblith, Norouzi, Hinton, ICML 2020, http://proceedings.mlr.press/v119/chen20j.html"
    uses_views = True
    loss_keys = ("nt_xent",)
    Params = SimCLRParams
    #: ``salad-med pretrain`` accepts it: its run holds an encoder for ``teacher_run`` / ``model.init_from``.
    pretrains_encoder = True

    def __init__(self, cfg, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self.loss_fn = NTXentLoss(self.params.tau)
        self.k_used: int | None = None

    def build_model(self) -> nn.Module:
        net = super().build_model()  # model.init_from applies (e.g. continue from another run's encoder)
        p = self.params
        return SimCLRNet(net, ProjectionHead(net.latent_dim, p.proj_hidden, p.proj_dim))

    def train_module(self, model: nn.Module) -> nn.Module:
        return SimCLRForward(model)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The encoder and the projection head (the decoder gets no gradient and stays as initialised)."""
        prefixes = ("projector.", *(f"net.{p}" for p in model.net.encoder_prefixes))
        return [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(prefixes)]

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return True  # the decoder is never used

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        return {"phase": "simclr"}

    def setup(self, trainer: Trainer) -> None:
        """The train split serves SimCLR's 2 views (whatever ``data.augment`` / ``train.augment_views``)."""
        attach_views(trainer.train_ds, N_VIEWS, simclr_augmentation(self.cfg.data.image_size, self.params))

    def training_loss(self, trainer, batch, outputs: Any) -> dict[str, torch.Tensor]:
        z_i, z_j = outputs
        loss = self.loss_fn(z_i, z_j)
        return {"total": loss, "nt_xent": loss}

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The representation ``h`` (B, D) (cosine kNN normalises it)."""
        return model.net.encoder_features(x).float()

    def feature_module(self, model: nn.Module) -> nn.Module:
        return Representation(model)

    def make_scorer(self):
        from salad_med.scoring.scorers import KNNScorer

        return KNNScorer(k=self.k_used or self.params.k, metric=self.params.metric, backend=self.cfg.score.backend)

    def fit_scorer(self, trainer):
        """kNN over the representations of the normal train images (k lowered, with a warning, to their
        number when larger)."""
        feats = trainer.train_features(self.features, normal_only=True)
        if self.k_used is None or int(feats.shape[0]) < self.k_used:  # warns once, not every epoch
            self.k_used = clamp_k(self.params.k, int(feats.shape[0]))
        return self.make_scorer().fit(feats)
