"""Data: the embedded synthetic generator, MVTec-layout loaders, the data root and downloads.

Chapter 1 (``book/01_data``) explains every piece.
"""

from adcore.data.cifar import CIFAR10_CLASSES, CIFAR10OneVsRest, read_cifar10
from adcore.data.cracks import count_tiles, crack_datasets, crack_root
from adcore.data.download import (
    REGISTRY,
    ChecksumError,
    DownloadError,
    IncompleteDownloadError,
    Resource,
    UnverifiedResourceError,
    download,
    ensure,
    sha256sum,
)
from adcore.data.extract import ArchiveError, ExtractionLimits, UnsafeArchiveError, safe_extract
from adcore.data.imageio import image_size, read_image, read_mask
from adcore.data.mvtec import MVTEC_CATEGORIES, FolderDataset, MVTecAD, load_image, load_mask
from adcore.data.root import data_root, shared_data_dir, synthetic_dataset
from adcore.data.synthetic import (
    DEFECT_TYPES,
    SYNTHETIC_CATEGORIES,
    SyntheticSample,
    make_synthetic_dataset,
    sample_image,
)
from adcore.data.ucsd import UCSDPed1, find_ucsd_ped1

__all__ = [
    "ArchiveError",
    "ChecksumError",
    "DownloadError",
    "ExtractionLimits",
    "IncompleteDownloadError",
    "UnsafeArchiveError",
    "UnverifiedResourceError",
    "ensure",
    "shared_data_dir",
    "CIFAR10_CLASSES",
    "DEFECT_TYPES",
    "MVTEC_CATEGORIES",
    "REGISTRY",
    "SYNTHETIC_CATEGORIES",
    "CIFAR10OneVsRest",
    "FolderDataset",
    "MVTecAD",
    "Resource",
    "SyntheticSample",
    "count_tiles",
    "crack_datasets",
    "crack_root",
    "data_root",
    "download",
    "image_size",
    "load_image",
    "load_mask",
    "make_synthetic_dataset",
    "read_image",
    "read_mask",
    "safe_extract",
    "sample_image",
    "read_cifar10",
    "sha256sum",
    "synthetic_dataset",
    "UCSDPed1",
    "find_ucsd_ped1",
]
