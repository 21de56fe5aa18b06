"""salad-med: SALAD anomaly detection on X-rays (Bozorgtabar et al., MICCAI 2020), on MONAI.

Packages: :mod:`preprocessing` (readers and MONAI transforms) feeds :mod:`salad_med`
(manifests, splits, networks, losses, trainer, scoring, CLI, DICOM integration).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("salad-med")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.1.0"

__all__ = ["__version__"]
