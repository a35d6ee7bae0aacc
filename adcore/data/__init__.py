"""Data: the embedded synthetic generator, MVTec-layout loaders, the data root and downloads.

Chapter 1 (``book/01_data``) explains every piece.
"""

from adcore.data.download import REGISTRY, Resource, download, safe_extract, sha256sum
from adcore.data.mvtec import MVTEC_CATEGORIES, FolderDataset, MVTecAD, read_image, read_mask
from adcore.data.root import data_root, synthetic_dataset
from adcore.data.synthetic import (
    DEFECT_TYPES,
    SYNTHETIC_CATEGORIES,
    SyntheticSample,
    make_synthetic_dataset,
    sample_image,
)

__all__ = [
    "DEFECT_TYPES",
    "MVTEC_CATEGORIES",
    "REGISTRY",
    "SYNTHETIC_CATEGORIES",
    "FolderDataset",
    "MVTecAD",
    "Resource",
    "SyntheticSample",
    "data_root",
    "download",
    "make_synthetic_dataset",
    "read_image",
    "read_mask",
    "safe_extract",
    "sample_image",
    "sha256sum",
    "synthetic_dataset",
]
