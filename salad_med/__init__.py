"""salad-med: SALAD anomaly detection on X-rays (Bozorgtabar et al., MICCAI 2020), on MONAI.

Packages: :mod:`preprocessing` (readers and MONAI transforms) feeds :mod:`salad_med`:
``data`` (manifests, splits, cache, preprocess job), ``methods`` (the registry and one home per method),
``nets``, ``scoring`` (the kNN / Eq. 4 kernel, scorers, calibration, OOD guard), ``engine`` (trainer,
checkpoints, DDP), ``evaluation`` (inference, evaluate, compare, metrics, plots), ``dicom`` (SR, node),
``synthetic`` (phantoms), ``export`` and ``cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("salad-med")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.2.0"

__all__ = ["__version__"]
