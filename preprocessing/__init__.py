"""MONAI transforms and image readers for radiographs (PNG/JPEG and DICOM CR/DX).

This package holds no training code and never imports :mod:`salad_med`.
"""

__all__: list[str] = []
