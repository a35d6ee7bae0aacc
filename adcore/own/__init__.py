"""A reader's own images: fit a detector on a folder of normal images, score new ones.

``python -m adcore fit METHOD --train DIR --out MODEL.pt`` and ``python -m adcore score
--model MODEL.pt --images DIR --out OUTDIR`` (GUIDE §3). The pieces, one idea per module:

- :mod:`adcore.own.images`: finding and reading a folder of images (any size, grey or colour).
- :mod:`adcore.own.calibration`: thresholds at a stated false-alarm rate from normal images
  alone (order statistics), and the interval of the false-alarm rate they give.
- :mod:`adcore.own.detectors`: CFlow-AD and the VQ-VAE behind one ``anomaly_maps`` call.
- :mod:`adcore.own.model_file`: the single model file (weights, configuration, calibration,
  thresholds, provenance), written atomically, read with ``weights_only=True``.
- :mod:`adcore.own.fit`, :mod:`adcore.own.score`: the two commands; :mod:`adcore.own.cli`
  their argument parsers.

The appendix chapter ``book/10_own_images`` runs both commands on CrackForest crops.
"""

from adcore.own.calibration import (
    false_alarm_interval,
    smallest_fpr,
    split_calibration,
    threshold_rank,
    thresholds_from_scores,
)
from adcore.own.fit import FitOptions, fit_folder
from adcore.own.model_file import ModelFileError, load_model_file
from adcore.own.score import score_folder

__all__ = [
    "FitOptions",
    "ModelFileError",
    "false_alarm_interval",
    "fit_folder",
    "load_model_file",
    "score_folder",
    "smallest_fpr",
    "split_calibration",
    "threshold_rank",
    "thresholds_from_scores",
]
