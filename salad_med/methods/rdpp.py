"""Reverse Distillation++ (``rdpp``) and plain Reverse Distillation (``rd``) on a frozen SimCLR teacher.

Tien et al., "Revisiting Reverse Distillation for Anomaly Detection", CVPR 2023
(https://openaccess.thecvf.com/content/CVPR2023/html/Tien_Revisiting_Reverse_Distillation_for_Anomaly_Detection_CVPR_2023_paper.html;
the review we follow: ``shared/docs/papers/rdpp-cvpr2023-review.md``), on top of Deng & Li, "Anomaly Detection
via Reverse Distillation from One-Class Embedding", CVPR 2022 (https://arxiv.org/abs/2201.10703).

**Networks** (:class:`RDNet`). A frozen pre-trained teacher encoder ``E`` (our SimCLR encoder, trained from
scratch on the user's normals, see :mod:`salad_med.methods.components.teacher`) gives, for an image ``x_i``,
the features ``f_{i,k} = E^k(x_i)`` of its blocks ``k = 1..K`` (the pyramid levels ``params.levels``; conv6:
blocks 2, 3, 4, strides 4, 8, 16). RD++ adds a **linear projection** ``phi_k`` after each teacher block (a
1x1 convolution ``C_k -> C_k``: a linear map of every pixel's feature vector). The trainable **one-class
bottleneck embedding** (OCBE, :class:`OneClassBottleneck`) fuses the (projected) levels as RD's multi-scale
feature fusion does (each shallower level brought to the deepest level's grid by stride-2 3x3 convolution
blocks, concatenated) and compresses them with a stride-2 residual block into the bottleneck; the
**student decoder** (:class:`StudentDecoder`) mirrors the teacher: residual up-sampling blocks
(:class:`~salad_med.nets.blocks.ResidualUpBlock`) from the bottleneck back to each level's shape,
deepest first, giving the student's ``f^D_{i,k}``.

**Loss** (the review's equation, symbols as there; ``cos`` of two maps = the cosine of every pixel's
channel vectors, averaged over pixels, unless said otherwise)::

    L = L_KD + alpha L_SSOT + beta L_Recon + gamma L_Con

* ``L_KD = sum_k 1 - cos(f_{i,k}, f^D_{i,k})`` (:func:`kd_loss`, mean over the batch) -- RD's knowledge
  distillation: with ``params.kd_loss=flat`` (RD's and RD++'s reference code) the cosine of the flattened
  ``C_k H_k W_k`` vectors, with ``pixel`` (RD's paper, Eq. 2) the per-pixel cosine averaged over pixels.
* ``L_SSOT = 1/m 1/K sum_{i,j} sum_k S_{eps,rho}(sigma(phi_k(f_{i,k})), sigma(phi_k(f_{j,k})))``
  (:func:`ssot_loss`) -- the self-supervised optimal transport loss over the batch's normal images. Each
  ``sigma(phi_k(f_{i,k}))`` is the empirical measure of image ``i``'s ``H_k W_k`` pixels, each a point of the
  probability simplex (``sigma`` = softmax over the ``C_k`` channels), with uniform weights; ``S`` is the
  de-biased Sinkhorn divergence of ``geomloss.SamplesLoss("sinkhorn", p=2, debias=True, blur=params.ssot_blur)``
  (ground cost ``|a - b|^2 / 2``, ``eps = blur^2``, balanced: ``rho`` = infinity). Computing all ``m^2`` pairs
  is quadratic in the batch; every step pairs each normal ``i`` with one partner ``pi(i) != i`` (a random
  derangement, seeded by the run's seed, the epoch and the batch's rows), which estimates the mean of
  ``S`` over the pairs ``i != j`` without bias: this ``L_SSOT`` is the review's double sum divided by
  ``m (m - 1) / m``, a constant factor absorbed in ``alpha``. (The reference code pairs the batch with a
  shuffled copy of itself inside one point cloud, whose de-biased divergence is identically 0.)
* ``L_Recon = 1/K sum_k 1 - cos(phi_k(f_{i,k}), phi_k(~f_{i,k}))`` (:func:`recon_loss`), ``~f_{i,k} =
  E^k(xi(x_i))`` the teacher's features of a pseudo-anomaly ``xi(x_i)``: the image with seeded simplex noise
  added in a random box (:func:`pseudo_anomalies`, :func:`fractal_simplex_noise`); its projected features
  are pulled to those of the clean image (gradient through both, as the review's formula and the
  reference code have it).
* ``L_Con = 1/K sum_k max(0, cos(phi_k(f_{i,k}), ~f_{i,k}) - margin)`` (:func:`contrast_loss`): the
  projected normal features are pushed away from the teacher's raw pseudo-abnormal features until their
  cosine is at most ``params.con_margin`` (the review's ``f``; -0.5 is the margin of the reference code's
  ``CosineEmbeddingLoss``).

Known anomalies of the train split (``known_anomaly``) are left out of every term: RD++ trains on normals.

**Plain RD** (``rd``): ``alpha = beta = gamma = 0`` and no projection layer (without the three terms, a
linear ``phi_k`` followed by the OCBE's first linear convolution is only a re-parameterisation of it):
exactly ``rdpp`` with ``params.alpha=0 beta=0 gamma=0 projection=false`` (a test checks they train the same
weights).

**Anomaly map and score** (RD's inference): ``M(x) = sum_k up(1 - cos_pixel(f_k, f^D_k))`` (bilinear
up-sampling of each level's per-pixel map to the image), smoothed with a Gaussian (``params.map_sigma``
pixels at 256 px, RD's sigma 4, scaled to ``data.image_size``; MONAI's kernel, fixed at construction:
:class:`FixedGaussianFilter`); :meth:`Rdpp.anomaly_map` returns the
smoothed ``(B, 1, S, S)`` map, and the image score is its maximum (:class:`RDImageScore`, exported to
TorchScript/ONNX whole: teacher, projections, OCBE, decoder, map, smoothing and max).

Budget: the trainer's Adam (``train.lr``, ``train.beta1``; RD and RD++ use lr 5e-3, betas 0.5/0.999, batch
16, 10-300 epochs per MVTec class), the run's epochs. The reference weights of the auxiliary terms are
``0.2 / 1.11 x (1, 0.01, 0.1)`` (alpha 0.18, beta 0.0018, gamma 0.018): the defaults here.

Example:
    >>> cfg = load_config("demo", ["train.method=rdpp", "params.teacher_run=runs/simclr"])
    >>> train_from_manifest(cfg, "split.csv", "runs/rdpp")
    >>> load_run("runs/rdpp").anomaly_map(x)        # (B, 1, S, S); the score is its maximum

See Also:
    :mod:`salad_med.methods.spade` (the other map method on the same teacher),
    :mod:`salad_med.methods.components.teacher`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salad_med.config import config_field as _field
from salad_med.errors import ConfigError
from salad_med.methods.base import FeatureScoreNet, TrainBatch
from salad_med.methods.components.teacher import FrozenEncoder, TeacherMethod, TeacherParams
from salad_med.methods.registry import register_method
from salad_med.nets.blocks import ResidualUpBlock, down_block, replace_batchnorm

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer

__all__ = [
    "RD",
    "Rdpp",
    "RDParams",
    "RdppParams",
    "RDNet",
    "RDOutputs",
    "RDImageScore",
    "FixedGaussianFilter",
    "OneClassBottleneck",
    "StudentDecoder",
    "kd_loss",
    "ssot_loss",
    "recon_loss",
    "contrast_loss",
    "sinkhorn_divergence",
    "distance_maps",
    "simplex_noise_2d",
    "fractal_simplex_noise",
    "pseudo_anomalies",
    "derangement",
    "RD_SIGMA_AT_256",
    "SIMPLEX_DIAMETER",
]

#: RD's Gaussian smoothing of the anomaly map: sigma = 4 pixels on 256-pixel inputs.
RD_SIGMA_AT_256 = 4.0
#: Largest distance between two points of the probability simplex (two vertices): the Sinkhorn
#: annealing starts at this scale (a fixed, data-independent schedule).
SIMPLEX_DIAMETER = math.sqrt(2.0)


# ------------------------------------------------------------------------------------------------
# params
# ------------------------------------------------------------------------------------------------
@dataclass
class RDParams(TeacherParams):
    """``params`` of ``rd`` (plain Reverse Distillation; the ``teacher_*`` keys: see :class:`TeacherParams`)."""

    levels: list[int] = _field([], help="teacher blocks k = 1..K ([] = the network's: conv6 2,3,4; resnet18 1,2,3)")
    kd_loss: str = _field("flat", choices=("flat", "pixel"),
                          help="L_KD: cosine of flattened maps (RD's code) or per-pixel cosine averaged (RD's Eq. 2)")
    decoder_blocks: int = _field(2, min=1, max=8, help="residual blocks of the student decoder per teacher level")
    map_sigma: float = _field(RD_SIGMA_AT_256, min=0.0, max=64.0,
                              help="Gaussian smoothing of the map, pixels at 256 px (scaled to data.image_size)")


@dataclass
class RdppParams(RDParams):
    """``params`` of ``rdpp``: RD's, the loss weights, the Sinkhorn and the simplex-noise pseudo-anomalies."""

    alpha: float = _field(0.2 / 1.11, min=0.0, max=1000.0, help="weight of L_SSOT (reference code: 0.2 / 1.11)")
    beta: float = _field(0.2 * 0.01 / 1.11, min=0.0, max=1000.0,
                         help="weight of L_Recon (reference code: 0.2 x 0.01 / 1.11)")
    gamma: float = _field(0.2 * 0.1 / 1.11, min=0.0, max=1000.0,
                          help="weight of L_Con (reference code: 0.2 x 0.1 / 1.11)")
    projection: bool = _field(True, help="linear projection phi_k after each teacher block (false: identity)")
    ssot_blur: float = _field(0.05, min=1e-4, max=10.0, help="Sinkhorn blur (eps = blur^2; reference: 0.05)")
    ssot_scaling: float = _field(0.9, min=0.5, max=0.999, help="Sinkhorn eps-annealing ratio per iteration")
    ssot_points: int = _field(64, min=0, max=1000000,
                              help="L_SSOT: pixels per cloud at most, larger maps average-pooled first (0 = all; "
                                   "the cost grows with their square: 256 points take ~10x the time of 64 on CPU)")
    con_margin: float = _field(-0.5, min=-1.0, max=1.0, help="L_Con margin on the cosine (reference: -0.5)")
    noise_min: float = _field(10 / 256, min=0.0, max=1.0,
                              help="pseudo-anomaly box side, smallest, fraction of the image (reference: 10/256)")
    noise_max: float = _field(1 / 8, min=0.0, max=1.0,
                              help="pseudo-anomaly box side, largest, fraction of the image (reference: 1/8)")
    noise_amplitude: float = _field(0.2, min=0.0, max=1.0, help="simplex noise amplitude, image units (reference 0.2)")
    noise_octaves: int = _field(6, min=1, max=12, help="simplex noise octaves (reference: 6)")
    noise_persistence: float = _field(0.6, min=0.0, max=1.0, help="amplitude ratio of successive octaves (ref. 0.6)")
    noise_cycles: float = _field(2.0, min=0.05, max=64.0, help="base-octave noise cycles across the box side")


# ------------------------------------------------------------------------------------------------
# the loss terms (pure functions of feature lists; each level a (B, C_k, H_k, W_k) tensor)
# ------------------------------------------------------------------------------------------------
def _pixel_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of every pixel's channel vectors: ``(B, C, H, W) x2 -> (B, H, W)`` float32."""
    return F.cosine_similarity(a.float(), b.float(), dim=1)


def kd_loss(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor], mode: str = "flat") -> torch.Tensor:
    """``L_KD = sum_k 1 - cos(f_k, f^D_k)``, averaged over the batch.

    Args:
        teacher, student: ``[(B, C_k, H_k, W_k)]`` per level.
        mode: ``"flat"`` (cosine of each image's flattened ``C_k H_k W_k`` vectors, RD's code) or
            ``"pixel"`` (per-pixel cosine averaged over the ``H_k W_k`` pixels, RD's Eq. 2).

    Returns:
        Scalar float32.
    """
    if mode not in ("flat", "pixel"):
        msg = f"kd_loss mode {mode!r} is not one of ['flat', 'pixel']"
        raise ValueError(msg)
    total = torch.zeros((), device=teacher[0].device)
    for t, s in zip(teacher, student, strict=True):
        if mode == "flat":
            cos = F.cosine_similarity(t.float().flatten(1), s.float().flatten(1), dim=1)
        else:
            cos = _pixel_cos(t, s)
        total = total + (1.0 - cos).mean()
    return total


def distance_maps(teacher: Sequence[torch.Tensor], student: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """RD's per-level anomaly maps ``M^k(h, w) = 1 - cos(f_k(h, w), f^D_k(h, w))``: ``[(B, 1, H_k, W_k)]``."""
    return [(1.0 - _pixel_cos(t, s)).unsqueeze(1) for t, s in zip(teacher, student, strict=True)]


def sinkhorn_divergence(blur: float = 0.05, scaling: float = 0.9, diameter: float = SIMPLEX_DIAMETER):
    """The de-biased Sinkhorn divergence ``S_eps`` of geomloss (balanced, ``p = 2``: cost ``|a - b|^2 / 2``,
    ``eps = blur^2``), batched: ``(P, N, D), (P, M, D) -> (P,)`` for ``P`` pairs of uniform point clouds.

    ``diameter`` fixes the start of the eps-annealing (``sqrt 2``: the simplex's diameter).
    """
    from geomloss import SamplesLoss

    return SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, diameter=diameter, debias=True,
                       backend="tensorized")


def _clouds(feature: torch.Tensor, max_points: int = 0) -> torch.Tensor:
    """``(B, C, H, W) -> (B, N, C)``: each image's pixels as points of the simplex (softmax over C); with
    ``max_points > 0`` and more pixels than that, the map is first average-pooled to the largest grid
    ``h x w <= max_points`` of the same aspect (adaptive pooling), ``N = h w``."""
    f = feature.float()
    h, w = f.shape[-2:]
    if 0 < max_points < h * w:
        scale = math.sqrt(max_points / (h * w))
        f = F.adaptive_avg_pool2d(f, (max(1, int(h * scale)), max(1, int(w * scale))))
    return torch.softmax(f, dim=1).flatten(2).transpose(1, 2).contiguous()


def ssot_loss(projected: Sequence[torch.Tensor], partner: torch.Tensor, divergence=None,
              max_points: int = 0) -> torch.Tensor:
    """``L_SSOT`` estimated on the pairs ``(i, partner[i])``:
    ``1/K sum_k mean_i S(sigma(phi_k(f_{i,k})), sigma(phi_k(f_{partner(i),k})))``.

    Args:
        projected: ``[(B, C_k, H_k, W_k)]`` projected normal features ``phi_k(f_{i,k})``.
        partner: (B,) int64 rows (a :func:`derangement`: then an unbiased estimate of the mean of ``S`` over
            the pairs ``i != j``).
        divergence: ``(P, N, D), (P, N, D) -> (P,)`` (default: :func:`sinkhorn_divergence`).
        max_points: pixels per cloud at most (0 = all): larger maps are average-pooled first (the
            tensorised Sinkhorn costs ``B N^2`` per iteration; see :func:`_clouds`).

    Returns:
        Scalar float32 (0 for an empty batch).
    """
    divergence = divergence if divergence is not None else sinkhorn_divergence()
    total = torch.zeros((), device=projected[0].device)
    if projected[0].shape[0] == 0:
        return total
    for p in projected:
        clouds = _clouds(p, max_points)
        total = total + divergence(clouds, clouds[partner]).mean()
    return total / len(projected)


def recon_loss(projected: Sequence[torch.Tensor], projected_noisy: Sequence[torch.Tensor]) -> torch.Tensor:
    """``L_Recon = 1/K sum_k 1 - cos(phi_k(f_{i,k}), phi_k(~f_{i,k}))`` (per-pixel cosine, averaged)."""
    total = sum((1.0 - _pixel_cos(p, q)).mean() for p, q in zip(projected, projected_noisy, strict=True))
    return total / len(projected)


def contrast_loss(projected: Sequence[torch.Tensor], noisy_teacher: Sequence[torch.Tensor],
                  margin: float = -0.5) -> torch.Tensor:
    """``L_Con = 1/K sum_k max(0, cos(phi_k(f_{i,k}), ~f_{i,k}) - margin)`` (per-pixel cosine, averaged)."""
    total = sum((_pixel_cos(p, f) - margin).clamp_min(0.0).mean()
                for p, f in zip(projected, noisy_teacher, strict=True))
    return total / len(projected)


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation ``pi`` of ``range(n)`` without fixed point (``n >= 2``; ``[0]`` for ``n = 1``):
    a uniform random order, each row paired with the next one cyclically, so ``pi(i)`` is uniform over
    ``j != i``."""
    order = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[order] = order.roll(-1)
    return out


# ------------------------------------------------------------------------------------------------
# simplex noise (from scratch): the pseudo-anomalies xi(x)
# ------------------------------------------------------------------------------------------------
_F2 = 0.5 * (math.sqrt(3.0) - 1.0)  # skew of the square grid onto the simplex (triangle) grid
_G2 = (3.0 - math.sqrt(3.0)) / 6.0  # unskew
#: The 8 gradient directions of 2-D simplex noise (Gustavson's grad3 restricted to 2-D).
_GRADIENTS = ((1, 1), (-1, 1), (1, -1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


@lru_cache(maxsize=1)
def _default_permutation() -> torch.Tensor:
    """The lattice hash: a fixed permutation of 0..255 (seed 0), doubled to 512 entries."""
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    return torch.cat([perm, perm])


def simplex_noise_2d(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """2-D simplex noise (Perlin 2001; the algorithm of Gustavson, "Simplex noise demystified", 2005) at
    the points ``(x, y)``, vectorised in torch, float64.

    The plane is skewed onto a grid of equilateral triangles; the three corners of the triangle holding a
    point each contribute ``max(0, 0.5 - d^2)^4 (g . d)`` (``d`` the offset from the corner, ``g`` one of 8
    gradients chosen by hashing the corner through ``perm``); the sum is scaled by 70 to about [-1, 1].
    The noise is 0 at every lattice corner and smooth elsewhere.

    Args:
        x, y: coordinates of one shape (any).
        perm: 512 int64 (a permutation of 0..255, doubled); None = the fixed seed-0 table.

    Returns:
        Noise values, the shape of ``x``, float64.
    """
    perm = (_default_permutation() if perm is None else perm).to(x.device)
    x, y = x.double(), y.double()
    s = (x + y) * _F2
    i, j = torch.floor(x + s), torch.floor(y + s)
    t = (i + j) * _G2
    x0, y0 = x - (i - t), y - (j - t)
    i1 = (x0 > y0).to(torch.int64)  # lower (x0 > y0) or upper triangle
    j1 = 1 - i1
    corners = ((x0, y0, 0, 0), (x0 - i1 + _G2, y0 - j1 + _G2, i1, j1),
               (x0 - 1.0 + 2.0 * _G2, y0 - 1.0 + 2.0 * _G2, 1, 1))
    ii, jj = i.to(torch.int64) & 255, j.to(torch.int64) & 255
    grads = torch.tensor(_GRADIENTS, dtype=torch.float64, device=x.device)
    total = torch.zeros_like(x)
    for dx, dy, oi, oj in corners:
        g = grads[perm[ii + oi + perm[jj + oj]] % len(_GRADIENTS)]
        falloff = (0.5 - dx * dx - dy * dy).clamp_min(0.0)
        total = total + falloff**4 * (g[..., 0] * dx + g[..., 1] * dy)
    return 70.0 * total


def fractal_simplex_noise(height: int, width: int, offset: Sequence[float], cycles: float = 2.0, octaves: int = 6,
                          persistence: float = 0.6) -> torch.Tensor:
    """Fractal (multi-octave) simplex noise on a ``height x width`` grid, in [-1, 1], float32:
    ``sum_o p^o n(2^o nu u + offset) / sum_o p^o`` with ``u`` the pixel coordinates divided by the longer
    side, ``nu = cycles`` the base frequency and ``p = persistence``.
    """
    side = float(max(height, width))
    rows = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width) / side
    cols = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width) / side
    total = torch.zeros(height, width, dtype=torch.float64)
    norm = 0.0
    for o in range(octaves):
        freq, amp = cycles * 2.0**o, persistence**o
        total = total + amp * simplex_noise_2d(cols * freq + offset[0], rows * freq + offset[1])
        norm += amp
    return (total / max(norm, 1e-12)).clamp(-1.0, 1.0).float()


def pseudo_anomalies(x: torch.Tensor, seeds: Sequence[int], p: RdppParams) -> torch.Tensor:
    """``xi(x)``: each image with fractal simplex noise added inside a random box, clipped to [0, 1].

    Image ``b`` draws, from a generator seeded with ``seeds[b]`` only (so the noise is the same whatever
    the batch, device or process), the box sides in ``[noise_min, noise_max] x S`` pixels (at least 2),
    its position, and a noise offset; the added pattern is ``noise_amplitude x``
    :func:`fractal_simplex_noise`. As RD++'s reference data pipeline (boxes of 10-32 pixels at 256, 6
    octaves, persistence 0.6, amplitude 0.2), with 2-D noise on our 1-channel images.

    Args:
        x: (B, 1, S, S) images in [0, 1].
        seeds: B integers.
        p: the noise params.

    Returns:
        (B, 1, S, S) same dtype and device.
    """
    b, _, h, w = x.shape
    out = x.clone()
    side = min(h, w)
    lo = max(2, round(p.noise_min * side))
    hi = min(side, max(lo, round(p.noise_max * side)))
    for k in range(b):
        gen = torch.Generator().manual_seed(int(seeds[k]))
        bh, bw = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=gen))
        top = int(torch.randint(0, h - bh + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=gen))
        offset = (torch.rand(2, generator=gen, dtype=torch.float64) * 256.0).tolist()
        noise = fractal_simplex_noise(bh, bw, offset, p.noise_cycles, p.noise_octaves, p.noise_persistence)
        box = out[k, :, top:top + bh, left:left + bw]
        out[k, :, top:top + bh, left:left + bw] = (box + p.noise_amplitude * noise.to(x.device, x.dtype)).clamp(0, 1)
    return out


#: Stream tags of :func:`_seeds`: the pseudo-anomalies of an image, the SSOT partners of a batch.
_NOISE_STREAM, _PAIR_STREAM = 1, 2


def _seeds(*parts: int, n: int = 1) -> list[int]:
    """``n`` 63-bit integers derived from the non-negative ``parts`` (numpy's SeedSequence: order-sensitive,
    stable across versions and platforms)."""
    return [int(v) for v in np.random.SeedSequence([int(v) for v in parts]).generate_state(n, np.uint64) >> 1]


# ------------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------------
def _log2_ratio(big: int, small: int, what: str) -> int:
    """``log2(big / small)`` when it is a whole power of two, else a ConfigError naming ``what``."""
    if small < 1 or big % small or (big // small) & (big // small - 1):
        msg = f"params.levels: {what}: feature sides {big} and {small} are not a power of two apart"
        raise ConfigError(msg)
    return (big // small).bit_length() - 1


class _ResidualDown(nn.Module):
    """RD's one-class embedding block: ``relu(BN(conv3(relu(BN(conv3_s(x))))) + BN(conv1_s(x)))``, stride ``s``.

    Shapes:
        (B, C_in, H, W) -> (B, C_out, H / s, W / s).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(h)) + self.shortcut(x))


class OneClassBottleneck(nn.Module):
    """RD's OCBE: multi-scale feature fusion (MFF) and the one-class embedding (OCE).

    MFF brings every level to the deepest level's grid with stride-2 ``3x3 conv, BN, LeakyReLU`` blocks
    (:func:`~salad_med.nets.blocks.down_block`, ``C_K`` channels each; the deepest level as it is) and
    concatenates them (``K C_K`` channels); OCE is a stride-2 residual block (stride 1 when the deepest
    grid is 1 pixel or odd) to ``2 C_K`` channels: the bottleneck.

    Args:
        shapes: ``[(C_k, H_k, W_k)]`` of the teacher levels, shallow to deep.

    Shapes:
        ``forward([(B, C_k, H_k, W_k)]) -> (B, 2 C_K, H_b, W_b)``; ``out_shape = (2 C_K, H_b, W_b)``.
    """

    def __init__(self, shapes: Sequence[tuple[int, int, int]]) -> None:
        super().__init__()
        c_deep, h_deep, w_deep = shapes[-1]
        self.fuse = nn.ModuleList()
        for c, h, w in shapes:
            steps = _log2_ratio(h, h_deep, "fusion")
            if _log2_ratio(w, w_deep, "fusion") != steps:
                msg = f"params.levels: level of shape {(c, h, w)} is not a square grid like the deepest {shapes[-1]}"
                raise ConfigError(msg)
            blocks = [down_block(c if s == 0 else c_deep, c_deep, stride=2) for s in range(steps)]
            self.fuse.append(nn.Sequential(*blocks) if blocks else nn.Identity())
        stride = 2 if h_deep >= 2 and h_deep % 2 == 0 and w_deep % 2 == 0 else 1
        self.embed = _ResidualDown(len(shapes) * c_deep, 2 * c_deep, stride)
        self.out_shape = (2 * c_deep, h_deep // stride, w_deep // stride)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        fused = [f(x) for f, x in zip(self.fuse, features, strict=True)]
        return self.embed(torch.cat(fused, dim=1))


class StudentDecoder(nn.Module):
    """The student: residual up-sampling blocks from the bottleneck to each teacher level, deepest first.

    For level ``k`` (deep to shallow), ``log2(H_k / H_prev)`` blocks :class:`~salad_med.nets.blocks.ResidualUpBlock`
    of scale 2 (one of scale 1 when the sides are equal) to ``C_k`` channels, then ``blocks - 1`` of scale 1;
    the output is the student's ``f^D_k`` and the input of the next level.

    Args:
        in_shape: the bottleneck's ``(C_b, H_b, W_b)``.
        shapes: ``[(C_k, H_k, W_k)]`` of the teacher levels, shallow to deep.
        blocks: residual blocks per level (at least 1).

    Shapes:
        ``forward((B, C_b, H_b, W_b)) -> [(B, C_k, H_k, W_k)]`` shallow to deep (the teacher's order).
    """

    def __init__(self, in_shape: tuple[int, int, int], shapes: Sequence[tuple[int, int, int]], blocks: int = 2) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        c_prev, h_prev = in_shape[0], in_shape[1]
        for c, h, _w in reversed(list(shapes)):
            ups = _log2_ratio(h, h_prev, "student decoder")
            layers: list[nn.Module] = [ResidualUpBlock(c_prev if u == 0 else c, c, 2) for u in range(ups)]
            if not layers:
                layers.append(ResidualUpBlock(c_prev, c, 1))
            layers += [ResidualUpBlock(c, c, 1) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*layers))
            c_prev, h_prev = c, h

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], z
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out[::-1]


class RDOutputs(NamedTuple):
    """One training forward: teacher ``f_k``, projected ``phi_k(f_k)``, student ``f^D_k`` of the clean images,
    and (with pseudo-anomalies) the teacher's ``~f_k`` and projected ``phi_k(~f_k)`` of ``xi(x)``."""

    teacher: list[torch.Tensor]
    projected: list[torch.Tensor]
    student: list[torch.Tensor]
    teacher_noisy: list[torch.Tensor] | None
    projected_noisy: list[torch.Tensor] | None


class RDNet(nn.Module):
    """Frozen teacher, optional linear projections ``phi_k``, OCBE and student decoder.

    Args:
        teacher: the :class:`~salad_med.methods.components.teacher.FrozenEncoder` (its levels are the K blocks).
        projection: add ``phi_k`` (1x1 convolution ``C_k -> C_k`` with bias) after each teacher level.
        decoder_blocks: residual blocks per student level.
        norm: ``model.norm`` (BatchNorm replaced by a batch-independent layer unless ``batch``).

    Shapes:
        ``forward(x (B, 1, S, S), views (B, 1, 1, S, S) | None) -> RDOutputs``; :meth:`maps` ->
        ``[(B, 1, H_k, W_k)]``.
    """

    def __init__(self, teacher: FrozenEncoder, projection: bool = True, decoder_blocks: int = 2,
                 norm: str = "batch") -> None:
        super().__init__()
        self.teacher = teacher
        shapes = teacher.shapes
        self.projections = nn.ModuleList([nn.Conv2d(c, c, 1) for c, _, _ in shapes] if projection else [])
        self.bottleneck = replace_batchnorm(OneClassBottleneck(shapes), norm)
        self.decoder = replace_batchnorm(StudentDecoder(self.bottleneck.out_shape, shapes, decoder_blocks), norm)

    def project(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[phi_k(f_k)]`` (the features themselves without projection layers)."""
        if len(self.projections) == 0:
            return list(features)
        return [phi(f) for phi, f in zip(self.projections, features, strict=True)]

    def student(self, projected: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[f^D_k]`` = decoder(OCBE(projected features))."""
        return self.decoder(self.bottleneck(projected))

    def forward(self, x: torch.Tensor, views: torch.Tensor | None = None) -> RDOutputs:
        f = self.teacher(x)
        p = self.project(f)
        s = self.student(p)
        f_noisy = p_noisy = None
        if views is not None:
            f_noisy = self.teacher(views[:, 0])
            p_noisy = self.project(f_noisy)
        return RDOutputs(f, p, s, f_noisy, p_noisy)

    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """RD's per-level maps ``1 - cos(f_k, f^D_k)`` per pixel (:func:`distance_maps`)."""
        f = self.teacher(x)
        return distance_maps(f, self.student(self.project(f)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's unit embedding (the OOD guard's)."""
        return self.teacher.embed(x)

    def embedding_network(self) -> nn.Module:
        return self.teacher.net


class FixedGaussianFilter(nn.Module):
    """MONAI's ``GaussianFilter(2, sigma)`` (its ``gaussian_1d`` kernel: ``erf`` approximation, truncated at
    4 sigma; separable, zero padding) with the kernel computed once and kept as a buffer, so that
    TorchScript and ONNX see a convolution of fixed shape (MONAI's module builds its kernel from a
    parameter at every call, which the ONNX exporter refuses).

    Shapes:
        (B, 1, H, W) -> (B, 1, H, W).
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        from monai.networks.layers.convutils import gaussian_1d

        kernel = gaussian_1d(torch.tensor(float(sigma)), truncated=4.0, approx="erf").float()
        self.pad = int(kernel.numel() // 2)
        self.register_buffer("kernel_h", kernel.view(1, 1, -1, 1).clone(), persistent=False)
        self.register_buffer("kernel_w", kernel.view(1, 1, 1, -1).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.kernel_h, padding=(self.pad, 0))
        return F.conv2d(x, self.kernel_w, padding=(0, self.pad))


class RDImageScore(nn.Module):
    """``x (B, 1, S, S) -> (B, 1)``: the maximum of RD's smoothed anomaly map (what is exported).

    :meth:`anomaly_map` is ``M(x) = G_sigma * sum_k up(1 - cos(f_k, f^D_k))`` ``(B, 1, S, S)``; ``forward``
    its maximum over the pixels.

    Args:
        net: the :class:`RDNet`.
        sigma: Gaussian sigma in pixels of the input (0 = no smoothing).
    """

    def __init__(self, net: RDNet, sigma: float) -> None:
        super().__init__()
        self.net = net
        self.smooth: nn.Module = FixedGaussianFilter(sigma) if sigma > 0 else nn.Identity()

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        total = torch.zeros_like(x, dtype=torch.float32)
        for m in self.net.maps(x):
            total = total + F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)
        return self.smooth(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.anomaly_map(x).flatten(1).amax(dim=1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# the methods
# ------------------------------------------------------------------------------------------------
@register_method
class Rdpp(TeacherMethod):
    """Reverse Distillation++: teacher, projections, OCBE, student; L_KD + alpha L_SSOT + beta L_Recon + gamma L_Con."""

    name = "rdpp"
    title = "Reverse Distillation++: frozen SimCLR teacher, projections, OCBE, student decoder; max of the map"
    paper = "Tien et al., Revisiting Reverse Distillation for Anomaly Detection, CVPR 2023, " \
            "https://openaccess.thecvf.com/content/CVPR2023/html/Tien_Revisiting_Reverse_Distillation_for_" \
            "Anomaly_Detection_CVPR_2023_paper.html"
    map_kind = "native"
    loss_keys = ("kd", "ssot", "recon", "con")
    Params = RdppParams

    def __init__(self, cfg, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self._epoch = 0
        self._known: np.ndarray | None = None
        self._divergence = None

    # the loss weights and switches (rd: all off)
    def _weights(self) -> tuple[float, float, float]:
        p = self.params
        return float(p.alpha), float(p.beta), float(p.gamma)

    def _projection(self) -> bool:
        return bool(self.params.projection)

    def _uses_noise(self) -> bool:
        _, beta, gamma = self._weights()
        return beta > 0 or gamma > 0

    # ------------------------------------------------------------------ network
    def build_model(self) -> nn.Module:
        return RDNet(self.build_teacher(), projection=self._projection(),
                     decoder_blocks=int(self.params.decoder_blocks), norm=self.cfg.model.norm)

    def train_module(self, model: nn.Module) -> nn.Module:
        return model

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self._known = np.asarray(trainer.known_anomaly, dtype=bool).copy()

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._epoch = int(epoch)

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        return {"phase": self.name}

    def prepare_batch(self, batch: TrainBatch) -> TrainBatch:
        """Add the pseudo-anomalies ``xi(x)`` as the batch's one view (when beta or gamma is used): image
        ``i`` of dataset row ``r`` draws its noise from ``(seed, epoch, r)`` alone, so a resumed run, another
        batch size or another process draws the same."""
        if not self._uses_noise():
            return batch
        seeds = [_seeds(self.cfg.seed, self._epoch, _NOISE_STREAM, int(r))[0] for r in batch.index.tolist()]
        noisy = pseudo_anomalies(batch.x.float(), seeds, self.params).to(batch.x.dtype)
        return TrainBatch(batch.x, batch.index, noisy[:, None])

    # ------------------------------------------------------------------ loss
    def training_loss(self, trainer: Trainer, batch: TrainBatch, outputs: RDOutputs) -> dict[str, torch.Tensor]:
        """``L = L_KD + alpha L_SSOT + beta L_Recon + gamma L_Con`` over the batch's normal images."""
        alpha, beta, gamma = self._weights()
        rows = batch.index.tolist()
        known = self._known if self._known is not None else np.zeros(max(rows) + 1, dtype=bool)
        keep = torch.tensor([i for i, r in enumerate(rows) if not known[r]], dtype=torch.long,
                            device=batch.x.device)
        zero = sum(s.float().sum() for s in outputs.student) * 0.0  # keeps the graph when no normal is left
        if keep.numel() == 0:
            return {"total": zero, **dict.fromkeys(self.loss_keys, zero.detach())}

        def pick(feats):
            return [f.index_select(0, keep) for f in feats]

        f, p, s = pick(outputs.teacher), pick(outputs.projected), pick(outputs.student)
        kd = kd_loss(f, s, self.params.kd_loss)
        losses = {"kd": kd}
        total = kd + zero
        if alpha > 0:
            n = int(keep.numel())
            ssot = torch.zeros((), device=kd.device)
            if n >= 2:
                gen = torch.Generator().manual_seed(_seeds(self.cfg.seed, self._epoch, _PAIR_STREAM, *rows)[0])
                partner = derangement(n, gen).to(kd.device)
                ssot = ssot_loss(p, partner, self._sinkhorn(), int(self.params.ssot_points))
            losses["ssot"] = ssot
            total = total + alpha * ssot
        if (beta > 0 or gamma > 0) and outputs.teacher_noisy is not None:
            f_noisy, p_noisy = pick(outputs.teacher_noisy), pick(outputs.projected_noisy)
            if beta > 0:
                losses["recon"] = recon_loss(p, p_noisy)
                total = total + beta * losses["recon"]
            if gamma > 0:
                losses["con"] = contrast_loss(p, f_noisy, float(self.params.con_margin))
                total = total + gamma * losses["con"]
        return {"total": total, **losses}

    def _sinkhorn(self):
        if self._divergence is None:
            self._divergence = sinkhorn_divergence(float(self.params.ssot_blur), float(self.params.ssot_scaling))
        return self._divergence

    # ------------------------------------------------------------------ scoring
    def _sigma(self) -> float:
        return float(self.params.map_sigma) * self.cfg.data.image_size / 256.0

    def image_score_module(self, model: nn.Module) -> RDImageScore:
        """:class:`RDImageScore` of ``model`` (map smoothing scaled to ``data.image_size``)."""
        return RDImageScore(model, self._sigma()).to(next(model.parameters()).device)

    def make_scorer(self):
        """The score is the map's maximum itself: ``ReconstructionErrorScorer`` on the one-column feature
        (its mean over the one column is that column) only learns the threshold ``offset_``."""
        from salad_med.scoring.scorers import ReconstructionErrorScorer

        return ReconstructionErrorScorer()

    def fit_scorer(self, trainer: Trainer):
        """Nothing to learn but the threshold: 256 normal training images are enough for it."""
        return self.make_scorer().fit(trainer.train_features(self.features, normal_only=True, limit=256))

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 1): the maximum of the smoothed anomaly map."""
        return self.image_score_module(model)(x).float()

    def feature_module(self, model: nn.Module) -> nn.Module:
        return RDImageScore(model, self._sigma())

    def export_module(self, model: nn.Module, scorer) -> nn.Module:
        """``x -> (B,)`` raw score: :class:`RDImageScore` (network, map, smoothing, max) and the scorer's
        identity head; TorchScript and ONNX trace it whole."""
        return FeatureScoreNet(self.feature_module(model), scorer.to_module())

    @torch.no_grad()
    def anomaly_map(self, model: nn.Module, scorer, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)``: ``G_sigma * sum_k up(1 - cos(f_k, f^D_k))``; the raw score is its maximum."""
        return self.image_score_module(model).anomaly_map(x).float()


@register_method
class RD(Rdpp):
    """Plain Reverse Distillation: Rdpp without projections and with alpha = beta = gamma = 0 (L = L_KD)."""

    name = "rd"
    title = "Reverse Distillation: frozen SimCLR teacher, OCBE, student decoder (L_KD only); max of the map"
    paper = "Deng & Li, Anomaly Detection via Reverse Distillation from One-Class Embedding, CVPR 2022, " \
            "https://arxiv.org/abs/2201.10703"
    loss_keys = ("kd",)
    Params = RDParams

    def _weights(self) -> tuple[float, float, float]:
        return 0.0, 0.0, 0.0

    def _projection(self) -> bool:
        return False
