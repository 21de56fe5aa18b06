"""Uninformed Students: an ensemble of students regressing a distilled teacher's dense patch descriptors.

Bergmann, Fauser, Sattlegger, Steger, "Uninformed Students: Student-Teacher Anomaly Detection with
Discriminative Latent Embeddings", CVPR 2020 (https://arxiv.org/abs/1911.02357). The survey
``shared/docs/papers/ad-survey-us-spade-simclr.md`` presents it in its "Knowledge distillation /
Student-teacher-anomaly-detection" slides: teacher training with ``L_k`` (knowledge distillation, an L2
loss) and ``L_c`` (compactness) on ``p x p`` patches of 256 x 256 images; dense descriptors by Fast Dense
Feature Extraction (FDFE); ``M`` students regressing the teacher's outputs; "Anomaly score = e + v"; and
the multi-scale ensemble of ``p = 17, 33, 65`` (its table). The survey numbers no equation, so the
equations below are cited with the paper's numbers.

Symbols (paper) and where they live here:

* ``P``: the pre-trained network. The paper's is an ImageNet ResNet-18; ours is the frozen SimCLR encoder
  of the teacher API (``model.teacher``, :class:`~salad_med.methods.components.teacher.FrozenEncoder`,
  pre-trained offline on the run's own normal radiographs, or ``params.teacher_run``). ``P(p)`` is the
  global average of its feature pyramid (``params.levels``) on the ``p x p`` patch, at the image's own
  pixel scale (the patch is not resized).
* ``T^`` (``model.descriptors[l]``): the teacher, a patch descriptor network with a receptive field of
  exactly ``p_l`` pixels and ``d`` output channels, distilled from ``P`` through a linear decoder ``D``
  (``model.decoders[l]``, used only for distillation), paper Eq. (4) with ``lambda_m = 0`` (no triplet
  term): ``L(T^) = L_k + lambda_c L_c``, where
  Eq. (1) ``L_k = ||D(T^(p)) - P(p)||^2`` (:class:`KnowledgeDistillationLoss`, averaged over the
  patches of the batch) and Eq. (3) the compactness loss on the correlation matrix ``c_ij`` of the
  descriptor channels over the batch's patches (:class:`CompactnessLoss`; the paper sums the signed
  ``c_ij``, ``i != j``, which is bounded below by ``-d`` and rewards anti-correlation: we average
  ``c_ij^2``, as public re-implementations do, so ``lambda_c`` does not depend on ``d``).
* ``S_1..S_M`` (``model.students[l]``): ``M`` students per patch size, the teacher's architecture with
  their own random initialisations (one grouped convolution stack: group ``i`` is student ``i``).
  Eq. (6): ``L(S_i) = 1/(wh) sum_(r,c) ||mu^{S_i}_(r,c) - (y^T_(r,c) - mu) diag(sigma)^-1||^2`` with
  ``y^T`` the teacher's dense descriptors and ``mu``, ``sigma`` their per-channel mean and standard
  deviation over every pixel of the normal training images (``model.descriptor_mean/std``, measured once
  when the student phase starts) (:class:`StudentRegressionLoss`, the mean over the students).
* Scoring, per pixel and patch size (:func:`error_and_variance`): Eq. (7) ``mu_(r,c) = 1/M sum_i
  mu^{S_i}_(r,c)``; Eq. (8) regression error ``e_(r,c) = ||mu_(r,c) - (y^T_(r,c) - mu) diag(sigma)^-1||^2``;
  Eq. (9) predictive variance ``v_(r,c) = 1/M sum_i ||mu^{S_i}_(r,c)||^2 - ||mu_(r,c)||^2`` (computed as
  the equal ``1/M sum_i ||mu^{S_i} - mu||^2``, which cannot go negative by rounding); Eq. (10)
  ``e~ + v~ = (e - e_mu) / e_sigma + (v - v_mu) / v_sigma`` with the means and standard deviations of
  ``e`` and ``v`` over every pixel of the normal **training** images (``params.score_stats=val`` uses the
  validation normals instead, the paper's "validation set of anomaly-free images"; the default keeps the
  validation split for model selection and calibration only) (:func:`normalised_score`,
  ``model.error_stats``/``variance_stats``); Eq. (11) the multi-scale map ``1/L sum_l (e~_l + v~_l)``.
  The anomaly map is that map smoothed with a Gaussian (``params.map_sigma`` pixels at 256 px, scaled),
  the **image score its maximum**.

**Dense extraction** (the paper's FDFE): the descriptor and student networks have no stride and no pooling
(3x3 convolutions with dilations 1, 1, 2, 4, ... summing to ``(p - 1) / 2``, then two 1x1 layers,
LeakyReLU slope 5e-3 as the paper), so one pass over the reflect-padded image gives the descriptor of the
``p x p`` patch centred on every pixel, on the input grid (``(B, d, S, S)``): exactly what the network
gives for that patch alone (tested). The distillation targets ``P(p)`` need the patches themselves:
``params.patches_per_image`` random centres per image, cropped by one gather (no loop over patches).
``params.student_crop = c`` trains the students on one random ``c x c`` window of dense outputs per step
(the window's descriptors equal the whole image's there, tested): Eq. (6) is a mean over pixels, so this is
an unbiased subsample at ``c^2 / S^2`` of the cost (the CPU budget of ``python -m benchmarks accuracy``).

**Patch sizes**: the paper's 17/33/65 at 256 px, scaled to ``data.image_size``: ``p = 2 round(((p_256 - 1)
/ 2) S / 256) + 1`` (64 px: 5/9/17; 128 px: 9/17/33; 32 px: 3/5/9); ``params.patch_sizes`` overrides them.

**Budget**: everything runs inside the trainer's epochs (``train.pretrain_epochs + train.rounds x
train.epochs_per_round``): the first ``round(distill_fraction x E)`` epochs (at least 1, at most E - 1)
distil ``T^`` (phase ``distill``: only ``T^`` and ``D`` get gradients), the others train the students
(phase ``students``: ``T^`` frozen). Distillation epochs cannot score images, so they are not validated
(:meth:`~salad_med.methods.base.AnomalyMethod.validates`): model selection is among student epochs. The
inline SimCLR pre-training of ``P`` is the teacher API's (``params.teacher_*``, cached, shared with SPADE).
``params.teacher_init=random`` distils from ``P`` at its random initialisation instead (the
"random-teacher" ablation), ``params.distill_fraction=0`` trains the students on an undistilled random
``T^``. Resume is exact (the phase follows the epoch; the descriptor statistics are buffers).

**Export** (TorchScript and ONNX): the whole score (``T^``, students, statistics, smoothing, max) is one
traced module (``export_module``); the map is ``RunModel.anomaly_map`` / ``salad-med evaluate``.

Example:
    >>> cfg = load_config("demo", ["train.method=students"])       # inline SimCLR teacher, cached
    >>> train_from_manifest(cfg, "split.csv", "runs/students")
    >>> load_run("runs/students").anomaly_map(x)                  # (B, 1, S, S)

See Also:
    :mod:`salad_med.methods.components.teacher` (the frozen ``P``), :mod:`salad_med.methods.spade`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from salad_med.config import config_field as _field
from salad_med.errors import ConfigError
from salad_med.methods.components.teacher import FrozenEncoder, TeacherMethod, TeacherParams
from salad_med.methods.registry import register_method

if TYPE_CHECKING:
    from salad_med.engine.trainer import Trainer

__all__ = [
    "UninformedStudents",
    "StudentsParams",
    "UninformedStudentsNet",
    "PatchDescriptorNet",
    "StudentsForward",
    "KnowledgeDistillationLoss",
    "CompactnessLoss",
    "StudentRegressionLoss",
    "error_and_variance",
    "normalised_score",
    "default_patch_sizes",
    "dilation_schedule",
    "PAPER_PATCH_SIZES",
]

#: The paper's patch sizes on 256 x 256 images.
PAPER_PATCH_SIZES = (17, 33, 65)
PAPER_IMAGE_SIZE = 256
#: LeakyReLU slope of the paper's descriptor networks.
LEAKY_SLOPE = 5e-3
#: Floor of the standard deviations that normalise descriptors and scores (a constant channel would
#: otherwise divide by zero).
STD_FLOOR = 1e-6
PHASES = ("distill", "students")


@dataclass
class StudentsParams(TeacherParams):
    """``params`` of ``students`` (the ``teacher_*`` keys: see :class:`TeacherParams`)."""

    students: int = _field(3, min=2, max=64, help="M students per patch size (paper: 3; the variance v needs >= 2)")
    patch_sizes: list[int] = _field([], help="patch sizes p, odd, 3..data.image_size ([] = the paper's 17/33/65 at "
                                             "256 px scaled to data.image_size: 64 px 5/9/17, 128 px 9/17/33)")
    descriptor_dim: int = _field(64, min=2, max=1024, help="d, descriptor channels of the teacher T^ (paper: 128)")
    width: int = _field(32, min=1, max=1024, help="hidden channels of T^ and of each student")
    distill_fraction: float = _field(0.3, min=0.0, max=0.95,
                                     help="fraction of the run's epochs distilling T^ (at least 1, at most all but "
                                          "one); the rest trains the students. 0 = students of a random T^")
    patches_per_image: int = _field(16, min=1, max=4096, help="distillation: random patches per training image")
    student_crop: int = _field(0, min=0, max=8192,
                               help="student phase: regress the descriptors of one random c x c window per step "
                                    "instead of the whole image (0 = whole image, as the paper). Eq. 6 is a mean "
                                    "over pixels, so a window is an unbiased subsample at c^2/S^2 of the cost "
                                    "(32 at 64 px: 4x fewer pixels)")
    lambda_c: float = _field(1.0, min=0.0, max=1000.0, help="weight of the compactness loss L_c (L_k weighs 1)")
    levels: list[int] = _field([], help="pyramid levels of P pooled as the distillation target ([] = the "
                                        "network's: conv6 2,3,4; resnet18 1,2,3)")
    teacher_init: str = _field("simclr", choices=("simclr", "random"),
                               help="P: the SimCLR encoder (teacher_run or inline) or its random initialisation")
    score_stats: str = _field("train", choices=("train", "val"),
                              help="normals whose e and v statistics normalise the scores (train: the normal "
                                   "training images; val: the validation normals, as the paper)")
    map_sigma: float = _field(4.0, min=0.0, max=64.0,
                              help="Gaussian smoothing of the map, pixels at 256 px (scaled to data.image_size)")


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------
def default_patch_sizes(image_size: int) -> tuple[int, ...]:
    """The paper's 17/33/65 at 256 px scaled to ``image_size``: ``2 round(((p - 1) / 2) S / 256) + 1``
    (at least 3; duplicates of tiny images dropped). 256 -> (17, 33, 65), 64 -> (5, 9, 17), 32 -> (3, 5, 9)."""
    out: list[int] = []
    for p in PAPER_PATCH_SIZES:
        half = max(1, math.floor((p - 1) / 2 * image_size / PAPER_IMAGE_SIZE + 0.5))
        if 2 * half + 1 not in out:
            out.append(2 * half + 1)
    return tuple(out)


def dilation_schedule(patch_size: int) -> list[int]:
    """Dilations of the 3x3 layers of a network with a receptive field of exactly ``patch_size``:
    1, 1, 2, 4, ... (contiguous coverage, no gridding), the last one cut so that they sum to
    ``(patch_size - 1) / 2``. 17 -> [1, 1, 2, 4]; 33 -> [1, 1, 2, 4, 8]; 5 -> [1, 1]; 3 -> [1].

    Raises:
        ValueError: ``patch_size`` not odd or below 3.
    """
    p = int(patch_size)
    if p < 3 or p % 2 == 0:
        msg = f"patch size {patch_size} must be odd and at least 3"
        raise ValueError(msg)
    half, out, total, step = (p - 1) // 2, [], 0, 1
    while total < half:
        d = min(step, half - total)
        out.append(d)
        total += d
        if len(out) >= 2:
            step *= 2
    return out


# ------------------------------------------------------------------------------------------------
# networks
# ------------------------------------------------------------------------------------------------
class PatchDescriptorNet(nn.Module):
    """``G`` patch descriptor networks with a receptive field of exactly ``p x p`` pixels, side by side.

    Layers (no stride, no pooling, no normalisation): 3x3 convolutions of ``width`` channels with the
    dilations of :func:`dilation_schedule` (valid padding), a 1x1 convolution of ``width`` channels, each
    followed by LeakyReLU(5e-3), and a linear 1x1 convolution to ``dim`` channels. With ``groups = G`` the
    stack holds G independent networks (the first layer reads the shared input, the others are grouped
    convolutions): the students of one patch size run as one module.

    Args:
        patch_size: p (odd, >= 3).
        width: hidden channels per network.
        dim: output channels d per network.
        groups: G networks.

    Shapes:
        ``forward(patches (N, 1, H, W)) -> (N, G*d, H - p + 1, W - p + 1)`` (a ``p x p`` patch gives
        ``1 x 1``); ``dense(x (B, 1, S, S)) -> (B, G, d, S, S)``: the descriptor of the patch centred on
        each pixel of the reflect-padded image.
    """

    def __init__(self, patch_size: int, width: int, dim: int, groups: int = 1) -> None:
        super().__init__()
        self.patch_size, self.width, self.dim, self.groups = int(patch_size), int(width), int(dim), int(groups)
        layers: list[nn.Module] = []
        c_in, hidden = 1, self.groups * self.width
        for i, d in enumerate(dilation_schedule(patch_size)):
            layers += [nn.Conv2d(c_in, hidden, 3, dilation=d, groups=1 if i == 0 else self.groups),
                       nn.LeakyReLU(LEAKY_SLOPE)]
            c_in = hidden
        layers += [nn.Conv2d(hidden, hidden, 1, groups=self.groups), nn.LeakyReLU(LEAKY_SLOPE),
                   nn.Conv2d(hidden, self.groups * self.dim, 1, groups=self.groups)]
        self.body = nn.Sequential(*layers)

    @property
    def pad(self) -> int:
        return (self.patch_size - 1) // 2

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """Valid convolutions: ``(N, 1, H, W) -> (N, G*d, H - p + 1, W - p + 1)``."""
        return self.body(patches)

    def dense(self, x: torch.Tensor, window: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Descriptors of every pixel's patch: ``(B, 1, S, S) -> (B, G, d, S, S)`` (reflect padding).

        ``window = (row0, col0, c)`` describes only the ``c x c`` pixels from ``(row0, col0)``:
        ``(B, G, d, c, c)``, equal to ``dense(x)[..., row0:row0 + c, col0:col0 + c]`` (each output reads its
        own ``p x p`` patch of the padded image, and the window keeps all of them) at ``c^2 / S^2`` of the cost.
        """
        b, _, h, w = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        if window is not None:
            r0, c0, c = (int(v) for v in window)
            if not (c >= 1 and 0 <= r0 <= h - c and 0 <= c0 <= w - c):
                msg = f"window {window} does not fit a {h} x {w} image"
                raise ValueError(msg)
            xp, h, w = xp[:, :, r0:r0 + c + 2 * p, c0:c0 + c + 2 * p], c, c
        return self.body(xp).view(b, self.groups, self.dim, h, w)


def crop_patches(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, patch_size: int) -> torch.Tensor:
    """The ``p x p`` patches centred on ``(rows, cols)`` of the reflect-padded images, by one gather.

    Args:
        x: (B, 1, S, S) images.
        rows, cols: (B, n) int64 centres in ``[0, S)``.
        patch_size: p (odd).

    Returns:
        (B * n, 1, p, p), image-major; the patch :meth:`PatchDescriptorNet.dense` describes at that pixel.
    """
    pad = (patch_size - 1) // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")[:, 0]  # (B, S + 2 pad, S + 2 pad)
    offs = torch.arange(patch_size, device=x.device)
    r = (rows[..., None] + offs)[..., :, None]  # (B, n, p, 1): padded row = centre - pad + offset + pad
    c = (cols[..., None] + offs)[..., None, :]  # (B, n, 1, p)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None, None]
    return xp[b, r, c].reshape(-1, 1, patch_size, patch_size)


class UninformedStudentsNet(nn.Module):
    """The pure network: frozen ``P``, per patch size a teacher ``T^_l``, its decoder ``D_l`` and ``M``
    students ``S_l``, and the statistics that normalise descriptors and scores (buffers).

    Args:
        teacher: ``P``, the frozen pre-trained encoder (attribute ``teacher``, as the teacher API expects).
        patch_sizes: ``p_l`` of the L scales.
        students: M.
        width: hidden channels of every descriptor network.
        dim: d.
        sigma: Gaussian smoothing of the map in pixels (0 = none).

    Buffers:
        ``descriptor_mean``, ``descriptor_std`` (L, d): ``mu``, ``sigma`` of Eq. (6)/(8);
        ``error_stats``, ``variance_stats`` (L, 2): ``(e_mu, e_sigma)``, ``(v_mu, v_sigma)`` of Eq. (10);
        ``descriptor_stats_ready``, ``score_stats_ready``: whether they were measured.

    Modes:
        ``distill(x, rows, cols)`` and ``regress(x)`` give what the two training phases' losses need;
        ``forward(x)`` (eval) gives ``(image score (B,), anomaly map (B, 1, S, S))``.
    """

    def __init__(self, teacher: FrozenEncoder, patch_sizes: Sequence[int], students: int = 3, width: int = 32,
                 dim: int = 64, sigma: float = 0.0) -> None:
        super().__init__()
        from monai.networks.layers.convutils import gaussian_1d

        self.teacher = teacher
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.num_students, self.dim = int(students), int(dim)
        target_dim = sum(teacher.channels)
        self.descriptors = nn.ModuleList(PatchDescriptorNet(p, width, dim) for p in self.patch_sizes)
        self.decoders = nn.ModuleList(nn.Linear(dim, target_dim) for _ in self.patch_sizes)
        self.students = nn.ModuleList(PatchDescriptorNet(p, width, dim, groups=students) for p in self.patch_sizes)
        n = len(self.patch_sizes)
        self.register_buffer("descriptor_mean", torch.zeros(n, dim))
        self.register_buffer("descriptor_std", torch.ones(n, dim))
        self.register_buffer("error_stats", torch.tensor([[0.0, 1.0]] * n))
        self.register_buffer("variance_stats", torch.tensor([[0.0, 1.0]] * n))
        self.register_buffer("descriptor_stats_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("score_stats_ready", torch.zeros((), dtype=torch.bool))
        self.sigma = float(sigma)
        kernel = gaussian_1d(torch.tensor(self.sigma), truncated=4.0, approx="erf") if sigma > 0 else torch.ones(1)
        self.register_buffer("smoothing_kernel", kernel.float(), persistent=False)  # from the config, not saved

    def embedding_network(self) -> nn.Module:
        return self.teacher.net

    # ------------------------------------------------------------------ distillation phase
    def distill(self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per scale ``(D(T^(p)) (N, C_P), P(p) (N, C_P), T^(p) (N, d))`` of the patches centred on
        ``(rows, cols)`` (B, n) of ``x`` (N = B n); ``P`` runs without gradient."""
        out = []
        for p, descriptor, decoder in zip(self.patch_sizes, self.descriptors, self.decoders, strict=True):
            patches = crop_patches(x, rows, cols, p)
            target = self.teacher.pooled(patches)  # P(p), no gradient
            desc = descriptor(patches).flatten(1)  # (N, d): a p x p patch gives 1 x 1
            out.append((decoder(desc), target, desc))
        return out

    # ------------------------------------------------------------------ student phase
    def normalised_descriptors(self, x: torch.Tensor, scale: int,
                               window: tuple[int, int, int] | None = None) -> torch.Tensor:
        """``(y^T - mu) diag(sigma)^-1`` of scale ``scale``: (B, d, S, S) (or the window's), no gradient."""
        with torch.no_grad():
            y = self.descriptors[scale].dense(x, window)[:, 0].float()
            mean = self.descriptor_mean[scale].view(1, -1, 1, 1)
            std = self.descriptor_std[scale].view(1, -1, 1, 1)
            return (y - mean) / std

    def regress(self, x: torch.Tensor, window: tuple[int, int, int] | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per scale ``(students (B, M, d, S, S), normalised teacher descriptors (B, d, S, S))``; with
        ``window = (row0, col0, c)`` only those ``c x c`` pixels (:meth:`PatchDescriptorNet.dense`)."""
        return [(students.dense(x, window), self.normalised_descriptors(x, i, window))
                for i, students in enumerate(self.students)]

    # ------------------------------------------------------------------ scoring
    def scale_scores(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per scale ``(e, v)``, each (B, S, S) (Eq. 7-9)."""
        return [error_and_variance(s.float(), y) for s, y in self.regress(x)]

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. (10)-(11), smoothed: (B, 1, S, S)."""
        maps = [normalised_score(e, v, self.error_stats[i], self.variance_stats[i])
                for i, (e, v) in enumerate(self.scale_scores(x))]
        m = torch.stack(maps).mean(dim=0).unsqueeze(1)  # Eq. (11): mean over the L scales
        if self.sigma > 0:  # separable Gaussian (MONAI's kernel), replicate borders; fixed-shape convolutions
            k = self.smoothing_kernel  # (K,), K odd; so that ONNX export sees constant kernel shapes
            r = (k.numel() - 1) // 2
            m = F.pad(m, (r, r, r, r), mode="replicate")
            m = F.conv2d(F.conv2d(m, k.view(1, 1, -1, 1)), k.view(1, 1, 1, -1))
        return m

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image score (B,) = max of the map, anomaly map (B, 1, S, S))``."""
        m = self.anomaly_map(x)
        return m.flatten(1).amax(dim=1), m


class StudentsForward(nn.Module):
    """The training forward (the module DDP wraps), in the phase the method sets (:attr:`phase`).

    * ``distill``: ``x (B, 1, S, S) -> model.distill(x, rows, cols)`` with ``n = patches_per_image``
      random centres per image drawn from torch's global generator (checkpointed: resume is exact);
    * ``students``: ``x -> model.regress(x)``, or with ``crop = c`` (``0 < c < S``) ``model.regress(x, window)``
      over one random ``c x c`` window per step (the same for the batch; torch's global generator).
    """

    def __init__(self, model: UninformedStudentsNet, patches_per_image: int, crop: int = 0) -> None:
        super().__init__()
        self.model = model
        self.patches_per_image = int(patches_per_image)
        self.crop = int(crop)
        self.phase = "students"

    def forward(self, x: torch.Tensor, views: torch.Tensor | None = None):
        if self.phase == "distill":
            b, _, h, w = x.shape
            rows = torch.randint(0, h, (b, self.patches_per_image)).to(x.device)
            cols = torch.randint(0, w, (b, self.patches_per_image)).to(x.device)
            return self.model.distill(x, rows, cols)
        h, w = x.shape[-2:]
        if 0 < self.crop < min(h, w):
            r0 = int(torch.randint(0, h - self.crop + 1, (1,)))
            c0 = int(torch.randint(0, w - self.crop + 1, (1,)))
            return self.model.regress(x, (r0, c0, self.crop))
        return self.model.regress(x)


class _ImageScore(nn.Module):
    """``x (B, 1, S, S) -> (B, 1)`` image score: the features the scorer reads, and the export's."""

    def __init__(self, model: UninformedStudentsNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0].unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# losses and scores
# ------------------------------------------------------------------------------------------------
class KnowledgeDistillationLoss(nn.Module):
    """Paper Eq. (1), ``L_k = ||D(T^(p)) - P(p)||^2``, averaged over the batch's patches.

    Shapes:
        decoded, target: (N, C) -> scalar.
    """

    def forward(self, decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (decoded.float() - target.float()).square().sum(dim=1).mean()


class CompactnessLoss(nn.Module):
    """The descriptor compactness loss (paper Eq. 3) on the correlation matrix of the descriptors.

    Steps: standardise each of the d channels over the N descriptors of the batch (population standard
    deviation + ``eps``) -> ``c = z^T z / N`` (d, d) -> mean of ``c_ij^2`` over the ``d (d - 1)`` pairs
    ``i != j``. (The paper writes ``sum_{i != j} c_ij``; see the module docstring for the change.)

    Shapes:
        descriptors: (N, d), N >= 2, d >= 2 -> scalar in [0, 1].
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = float(eps)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        z = descriptors.float()
        n, d = z.shape
        z = z - z.mean(dim=0)
        z = z / (z.square().mean(dim=0).sqrt() + self.eps)
        c = z.T @ z / n
        off = c - torch.diag_embed(torch.diagonal(c))
        return off.square().sum() / (d * (d - 1))


class StudentRegressionLoss(nn.Module):
    """Paper Eq. (6) for each student, ``L(S_i) = 1/(wh) sum_(r,c) ||mu^{S_i}_(r,c) - y~_(r,c)||^2`` (y~ the
    normalised teacher descriptors), averaged over the batch and the M students.

    Shapes:
        students: (B, M, d, H, W); target: (B, d, H, W) -> scalar.
    """

    def forward(self, students: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_student = (students.float() - target.float().unsqueeze(1)).square().sum(dim=2).mean(dim=(0, 2, 3))
        return per_student.mean()


def error_and_variance(students: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Regression error and predictive variance per pixel (paper Eq. 7-9).

    Args:
        students: (B, M, d, H, W) student predictions ``mu^{S_i}``.
        target: (B, d, H, W) normalised teacher descriptors ``(y^T - mu) diag(sigma)^-1``.

    Returns:
        ``(e, v)``, each (B, H, W): ``e = ||mu - target||^2`` with ``mu`` the students' mean (Eq. 7, 8),
        ``v = 1/M sum_i ||mu^{S_i} - mu||^2`` (= Eq. 9's ``1/M sum_i ||mu^{S_i}||^2 - ||mu||^2``).
    """
    mean = students.mean(dim=1)
    e = (mean - target).square().sum(dim=1)
    v = (students - mean.unsqueeze(1)).square().sum(dim=2).mean(dim=1)
    return e, v


def normalised_score(e: torch.Tensor, v: torch.Tensor, error_stats: torch.Tensor,
                     variance_stats: torch.Tensor) -> torch.Tensor:
    """Paper Eq. (10): ``(e - e_mu) / e_sigma + (v - v_mu) / v_sigma``; ``*_stats`` = ``(mean, std)``."""
    return (e - error_stats[0]) / error_stats[1] + (v - variance_stats[0]) / variance_stats[1]


class _Moments:
    """Running mean and standard deviation of many values per channel (float64 sums)."""

    def __init__(self) -> None:
        self.n, self.s, self.s2 = 0, None, None

    def add(self, values: torch.Tensor) -> None:
        """``values`` (N, C): N more observations of C channels."""
        v = values.detach().double()
        s, s2 = v.sum(dim=0), v.square().sum(dim=0)
        self.s = s if self.s is None else self.s + s
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += int(v.shape[0])

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.s / self.n
        var = (self.s2 / self.n - mean.square()).clamp_min(0.0)
        return mean.float(), var.sqrt().float().clamp_min(STD_FLOOR)


# ------------------------------------------------------------------------------------------------
# the method
# ------------------------------------------------------------------------------------------------
@register_method
class UninformedStudents(TeacherMethod):
    """Students regressing a distilled teacher's dense descriptors; score = max of the smoothed e + v map."""

    name = "students"
    title = "Uninformed Students: M students regress a distilled patch teacher; map = e + v, score = its max"
    paper = ("Bergmann, Fauser, Sattlegger, Steger, Uninformed Students, CVPR 2020, "
             "https://arxiv.org/abs/1911.02357")
    map_kind = "native"
    loss_keys = ("distill", "compact", "student")
    Params = StudentsParams

    def __init__(self, cfg, num_train: int = 0) -> None:
        super().__init__(cfg, num_train)
        self.patch_sizes = self._patch_sizes()
        self.kd_loss, self.compact_loss, self.student_loss = (KnowledgeDistillationLoss(), CompactnessLoss(),
                                                              StudentRegressionLoss())
        self._forward: StudentsForward | None = None

    # ------------------------------------------------------------------ configuration
    def _patch_sizes(self) -> tuple[int, ...]:
        size = int(self.cfg.data.image_size)
        sizes = tuple(int(p) for p in self.params.patch_sizes) or default_patch_sizes(size)
        bad = [p for p in sizes if p < 3 or p % 2 == 0 or p > size]
        if bad:
            msg = (f"params.patch_sizes={list(sizes)}: {bad} not odd or not in [3, data.image_size={size}] (a "
                   f"patch is centred on a pixel and fits the image)")
            raise ConfigError(msg)
        return sizes

    @property
    def distill_epochs(self) -> int:
        """Epochs distilling ``T^``: ``round(distill_fraction x E)``, at least 1 (0 if the fraction is 0),
        at most ``E - 1``."""
        total, f = self.num_epochs(), float(self.params.distill_fraction)
        if f <= 0:
            return 0
        return max(1, min(math.floor(total * f + 0.5), total - 1))

    def phase(self, epoch: int) -> str:
        """``"distill"`` or ``"students"`` for 0-based ``epoch``."""
        return "distill" if epoch < self.distill_epochs else "students"

    # ------------------------------------------------------------------ network
    def build_model(self) -> nn.Module:
        p = self.params
        sigma = p.map_sigma * self.cfg.data.image_size / PAPER_IMAGE_SIZE
        return UninformedStudentsNet(self.build_teacher(), self.patch_sizes, students=p.students, width=p.width,
                                     dim=p.descriptor_dim, sigma=sigma)

    def train_module(self, model: nn.Module) -> nn.Module:
        self._forward = StudentsForward(model, self.params.patches_per_image, self.params.student_crop)
        return self._forward

    @property
    def ddp_find_unused_parameters(self) -> bool:
        return True  # each phase trains one part

    # ------------------------------------------------------------------ training hooks
    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        total = self.num_epochs()
        if self.distill_epochs >= total:
            msg = (f"students: {total} epoch(s) leave none for the students after distilling the teacher "
                   f"(params.distill_fraction={self.params.distill_fraction}); give at least 2 epochs "
                   f"(train.pretrain_epochs + train.rounds x train.epochs_per_round) or params.distill_fraction=0")
            raise ConfigError(msg)

    def on_fit_start(self, trainer: Trainer) -> None:
        """Load the pre-trained ``P`` (teacher API), unless it is random or unused (no distillation)."""
        if self.params.teacher_init == "random" or self.distill_epochs == 0:
            self.teacher_info = {"source": "random" if self.distill_epochs else "unused (no distillation)"}
            return
        super().on_fit_start(trainer)

    def epoch_info(self, epoch: int) -> dict[str, Any]:
        return {"phase": self.phase(epoch)}

    def validates(self, epoch: int) -> bool:
        """Distillation epochs have no students to score with."""
        return self.phase(epoch) == "students"

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        phase = self.phase(epoch)
        if self._forward is not None:
            self._forward.phase = phase
        if phase == "students":
            self.ensure_descriptor_stats(trainer)

    def training_loss(self, trainer, batch, outputs: Any) -> dict[str, torch.Tensor]:
        if self._forward is not None and self._forward.phase == "distill":
            kd = torch.stack([self.kd_loss(dec, tgt) for dec, tgt, _ in outputs]).mean()
            lc = torch.stack([self.compact_loss(desc) for _, _, desc in outputs]).mean()
            return {"total": kd + self.params.lambda_c * lc, "distill": kd, "compact": lc}
        st = torch.stack([self.student_loss(s, y) for s, y in outputs]).mean()
        return {"total": st, "student": st}

    # ------------------------------------------------------------------ statistics
    def _loader(self, dataset, rows):
        from torch.utils.data import DataLoader

        from salad_med.data.dataset import ImagesOnly

        return DataLoader(ImagesOnly(dataset, rows), batch_size=max(2 * self.cfg.train.batch_size, 32),
                          shuffle=False, num_workers=self.cfg.data.num_workers)

    @torch.no_grad()
    def ensure_descriptor_stats(self, trainer: Trainer) -> None:
        """``mu``, ``sigma`` of Eq. (6): per-channel mean and standard deviation of ``T^``'s dense descriptors
        over every pixel of the normal training images, measured once (when the student phase starts; a
        resumed run has them in its checkpoint)."""
        model = trainer.model
        if bool(model.descriptor_stats_ready):
            return
        rows = np.flatnonzero(~np.asarray(trainer.known_anomaly, dtype=bool))
        moments = [_Moments() for _ in model.patch_sizes]
        for batch in self._loader(trainer.train_ds, rows):
            x = batch["image"].to(trainer.device)
            for m, descriptor in zip(moments, model.descriptors, strict=True):
                y = descriptor.dense(x)[:, 0].float()  # (B, d, S, S)
                m.add(y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]))
        for i, m in enumerate(moments):
            mean, std = m.mean_std()
            model.descriptor_mean[i].copy_(mean)
            model.descriptor_std[i].copy_(std)
        model.descriptor_stats_ready.fill_(True)

    @torch.no_grad()
    def fit_score_stats(self, model: UninformedStudentsNet, dataset, rows, device) -> None:
        """``(e_mu, e_sigma)``, ``(v_mu, v_sigma)`` of Eq. (10) per scale over every pixel of ``dataset[rows]``."""
        moments = [(_Moments(), _Moments()) for _ in model.patch_sizes]
        for batch in self._loader(dataset, rows):
            for (me, mv), (e, v) in zip(moments, model.scale_scores(batch["image"].to(device)), strict=True):
                me.add(e.reshape(-1, 1))
                mv.add(v.reshape(-1, 1))
        for i, (me, mv) in enumerate(moments):
            model.error_stats[i].copy_(torch.cat(me.mean_std()))
            model.variance_stats[i].copy_(torch.cat(mv.mean_std()))
        model.score_stats_ready.fill_(True)

    # ------------------------------------------------------------------ scoring
    def fit_scorer(self, trainer: Trainer):
        """Measure the e / v statistics (``params.score_stats`` normals), then fit the pass-through scorer
        (the image score is the network's; :class:`~salad_med.scoring.scorers.ReconstructionErrorScorer`,
        the mean of one value, only adds the training threshold ``offset_``)."""
        from salad_med.scoring.scorers import ReconstructionErrorScorer

        model = trainer.model
        self.ensure_descriptor_stats(trainer)
        if self.params.score_stats == "val":
            ds, rows = trainer.val_ds, np.flatnonzero(np.asarray(trainer.val_ds.labels) == 0)
        else:
            ds, rows = trainer.train_ds, np.flatnonzero(~np.asarray(trainer.known_anomaly, dtype=bool))
        self.fit_score_stats(model, ds, rows, trainer.device)
        feats = trainer.train_features(self.features, normal_only=True, limit=128)
        return ReconstructionErrorScorer().fit(feats)

    def make_scorer(self):
        from salad_med.scoring.scorers import ReconstructionErrorScorer

        return ReconstructionErrorScorer()

    @torch.no_grad()
    def features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The image score as a (B, 1) feature (max of the smoothed map)."""
        return model(x)[0].float().unsqueeze(1)

    def feature_module(self, model: nn.Module) -> nn.Module:
        return _ImageScore(model)

    @torch.no_grad()
    def anomaly_map(self, model: nn.Module, scorer, x: torch.Tensor) -> torch.Tensor | None:
        """Eq. (11) smoothed, (B, 1, S, S) on the input grid (None before the statistics exist)."""
        if not bool(model.score_stats_ready):
            return None
        return model.anomaly_map(x).float()
