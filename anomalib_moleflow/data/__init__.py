"""Data modules of anomalib-moleflow.

:class:`MVTecADLocal` reads a local MVTec AD folder and never downloads; it can
be named in configs as ``class_path: anomalib_moleflow.data.MVTecADLocal``.
"""

from .mvtec import (
    MVTEC_AD_CATEGORIES,
    ImageReadError,
    MVTecADLocal,
    MVTecADLocalDataset,
    check_mvtec_layout,
)

__all__ = ["MVTEC_AD_CATEGORIES", "ImageReadError", "MVTecADLocal", "MVTecADLocalDataset", "check_mvtec_layout"]
