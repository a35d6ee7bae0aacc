"""Tests of adcore.metrics: image / pixel AUROC and AUPRO, exact, against independent references.

The AUROC references are scikit-learn's. The AUPRO reference below is written straight from the
MVTec AD definition, one threshold at a time (label the regions, measure each region's overlap,
count the false positives), with scikit-image's labelling, so it shares no code with adcore.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from skimage.measure import label as skimage_label
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from adcore.metrics import (
    _arrays,
    aupro,
    image_auroc,
    pixel_auroc,
    pixel_auroc_of_each_image,
    pro_curve,
    roc_curve,
)


@pytest.fixture(autouse=True, params=["numpy", "torch"])
def cpu_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test with both backends: NumPy, and torch (the GPU code path) on the CPU."""
    monkeypatch.setattr(_arrays, "CPU_BACKEND", request.param)
    return request.param


RNG = np.random.default_rng(2024)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# ---------------------------------------------------------------- the slow references


def reference_pro_points(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, highest first, from the definition; (0, 0) prepended."""
    masks = masks.astype(bool)
    regions = []  # one boolean image-sized array per connected region (8-connectivity)
    for index, mask in enumerate(masks):
        labelled = skimage_label(mask, connectivity=2)
        for region_id in range(1, labelled.max() + 1):
            regions.append((index, labelled == region_id))
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        overlaps = [predicted[index][region].mean() for index, region in regions]
        pros.append(float(np.mean(overlaps)))
        fprs.append(float((predicted & normal).sum() / normal.sum()))
    return np.array(fprs), np.array(pros)


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Trapezoidal area under the PRO curve for FPR in [0, fpr_limit], divided by fpr_limit."""
    fprs, pros = reference_pro_points(maps, masks)
    area = 0.0
    for f0, p0, f1, p1 in zip(fprs[:-1], pros[:-1], fprs[1:], pros[1:]):
        if f0 >= fpr_limit:
            break
        if f1 <= fpr_limit:
            area += (f1 - f0) * (p0 + p1) / 2
        else:  # the segment crosses the limit: interpolate the PRO exactly there
            pro_at_limit = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            area += (fpr_limit - f0) * (p0 + pro_at_limit) / 2
            break
    return area / fpr_limit


def sklearn_mean_of_each_image(maps: np.ndarray, masks: np.ndarray) -> float:
    values = [roc_auc_score(mask.ravel(), amap.ravel()) for amap, mask in zip(maps, masks)
              if 0 < mask.sum() < mask.size]
    return float(np.mean(values))


# ---------------------------------------------------------------- data


def tied_maps(seed: int, n: int = 4, size: int = 12, levels: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Maps with many ties (few score levels) and random blobby masks, every image mixed."""
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, levels, size=(n, size, size)).astype(np.float64)
    masks = rng.random((n, size, size)) < 0.25
    masks[:, 0, 0], masks[:, -1, -1] = True, False
    maps = maps + 1.5 * masks  # a little signal so the values are not all near 0.5
    return maps, masks


# ---------------------------------------------------------------- image AUROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 7, size=200).astype(np.float64)
    labels = rng.random(200) < 0.3
    scores[labels] += rng.integers(0, 3, size=labels.sum())
    expected = roc_auc_score(labels, scores)
    assert image_auroc(scores, labels) == pytest.approx(expected, abs=1e-9)
    assert image_auroc(torch.from_numpy(scores).float(), torch.from_numpy(labels)) == pytest.approx(expected, abs=1e-9)


def test_image_auroc_hand_computed_mann_whitney() -> None:
    # positives 3, 1; negatives 1, 0: pairs (3>1) (3>0) (1=1 -> 1/2) (1>0) -> 3.5 / 4
    assert image_auroc([3.0, 1.0, 1.0, 0.0], [1, 1, 0, 0]) == pytest.approx(0.875, abs=1e-15)


def test_image_auroc_returns_python_float_and_accepts_lists() -> None:
    value = image_auroc([0.1, 0.9], [0, 1])
    assert type(value) is float and value == 1.0


def test_float64_scores_that_collide_in_float32_stay_distinct() -> None:
    scores = np.array([1.0, 1.0 + 1e-12, 2.0, 2.0 + 1e-12])
    labels = np.array([0, 1, 0, 1])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(scores, labels) == pytest.approx(0.75, abs=1e-12)


def test_negative_and_signed_zero_scores() -> None:
    assert image_auroc(np.array([-0.0, 0.0], dtype=np.float32), [1, 0]) == 0.5  # -0.0 == 0.0: a tie
    scores = np.array([-3.5, -1e-30, -np.float32(1e-45), 0.0, 1e-30, 7.0], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1])
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64, torch.uint8])
def test_image_auroc_other_dtypes(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 50, size=300)
    labels = rng.random(300) < 0.4
    scores[labels] += 10
    expected = roc_auc_score(labels, scores)
    assert image_auroc(torch.from_numpy(scores).to(dtype), labels) == pytest.approx(expected, abs=1e-9)


# ---------------------------------------------------------------- pixel AUROC


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_equals_sklearn_on_all_pixels(seed: int) -> None:
    maps, masks = tied_maps(seed)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-9)
    tensor_value = pixel_auroc(torch.from_numpy(maps).float()[:, None], torch.from_numpy(masks)[:, None].float())
    assert tensor_value == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_per_image_is_the_mean_over_mixed_images() -> None:
    maps, masks = tied_maps(5, n=5)
    masks[1] = False  # an anomaly-free image: no ROC of its own, left out
    masks[3] = True  # an image anomalous everywhere: also left out
    expected = sklearn_mean_of_each_image(maps, masks)
    assert pixel_auroc(maps, masks, per_image=True) == pytest.approx(expected, abs=1e-9)
    each = pixel_auroc_of_each_image(maps, masks)
    assert each.shape == (5,) and np.isnan(each[1]) and np.isnan(each[3])
    for index in (0, 2, 4):
        assert each[index] == pytest.approx(roc_auc_score(masks[index].ravel(), maps[index].ravel()), abs=1e-12)


def test_per_image_ignores_each_images_scale_but_global_does_not() -> None:
    # Two images each ranked perfectly, but image 1's scores sit far below image 0's normal
    # pixels: per image (the VQ-VAE authors' convention, min-max normalised) both are 1.0;
    # over all pixels together the anomalies of image 1 lose to the normal pixels of image 0.
    maps = np.array([[[10.0, 11.0], [10.0, 20.0]], [[0.0, 1.0], [0.0, 2.0]]])
    masks = np.array([[[0, 0], [0, 1]], [[0, 0], [0, 1]]], dtype=bool)
    assert pixel_auroc(maps, masks, per_image=True) == 1.0
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_auroc(maps, masks) < 0.9


def test_roc_curve_equals_sklearn() -> None:
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 20, size=500).astype(np.float32)
    labels = rng.random(500) < 0.2
    curve = roc_curve(scores, labels)
    fpr, tpr, thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(curve.tpr, tpr, atol=1e-12)
    np.testing.assert_array_equal(curve.thresholds[1:], thresholds[1:])
    assert curve.thresholds[0] == np.inf
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(image_auroc(scores, labels), abs=1e-12)


def test_roc_curve_max_points_keeps_the_ends() -> None:
    rng = np.random.default_rng(0)
    curve = roc_curve(rng.random(1000), rng.random(1000) < 0.5, max_points=50)
    assert len(curve.fpr) <= 50 and len(curve.tpr) == len(curve.fpr) == len(curve.thresholds)
    assert (curve.fpr[0], curve.tpr[0], curve.fpr[-1], curve.tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


# ---------------------------------------------------------------- AUPRO


def test_aupro_hand_computed() -> None:
    # one region of 2 pixels; curve (0,0) (0,.5) (.5,.5) (.5,1) (1,1)
    maps = np.array([[0.9, 0.2, 0.5, 0.1]])
    masks = np.array([[1, 1, 0, 0]])
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.75, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(0.5, abs=1e-12)  # limit on a point
    assert aupro(maps, masks, fpr_limit=0.75) == pytest.approx((0.25 + 0.25) / 0.75, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_equals_reference_on_random_maps(seed: int, fpr_limit: float) -> None:
    maps, masks = tied_maps(seed)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=1e-6)


def test_aupro_equals_reference_without_ties() -> None:
    rng = np.random.default_rng(12)
    masks = np.zeros((3, 10, 10), dtype=bool)
    masks[0, 2:5, 3:7] = masks[1, 6:, 6:] = masks[2, 0, :] = True
    maps = (rng.random(masks.shape) + 0.7 * masks).astype(np.float32)  # all scores distinct
    assert len(np.unique(maps)) == maps.size
    for fpr_limit in (0.3, 0.02, 1.0):
        assert aupro(maps, masks, fpr_limit) == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=1e-6)


def _structured_case(name: str) -> np.ndarray:
    masks = np.zeros((2, 16, 16), dtype=bool)
    if name == "one region":
        masks[0, 4:9, 5:11] = True
    elif name == "many regions":
        for k in range(5):
            masks[k % 2, 2 * k + 1: 2 * k + 2 + k, 3 * k: 3 * k + 2] = True
        masks[1, 12:15, 12:15] = True
    elif name == "touching regions":
        masks[0, 2:6, 2:6] = True
        masks[0, 6:8, 6:12] = True  # touches the first block by a corner only: one 8-region
        masks[1, 3:5, 3:5] = True
        masks[1, 5:9, 5] = True  # diagonal neighbour again
    elif name == "border regions":
        masks[0, :3, :] = True  # a region along the whole top edge
        masks[1, 10:, 14:] = True  # a region in the corner
        masks[1, 0, 0] = True  # a single pixel in the other corner
    return masks


@pytest.mark.parametrize("name", ["one region", "many regions", "touching regions", "border regions"])
def test_aupro_equals_reference_on_structured_masks(name: str) -> None:
    masks = _structured_case(name)
    rng = np.random.default_rng(11)
    maps = np.round(rng.normal(size=masks.shape) + 1.2 * masks, 1)  # rounding makes ties
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-6)
    assert aupro(maps, masks, 0.6) == pytest.approx(reference_aupro(maps, masks, 0.6), abs=1e-6)


def test_aupro_uses_8_connectivity() -> None:
    # Two pixels touching by a corner are ONE region: detecting one of them gives PRO 1/2, not
    # (1 + 0) / 2 over two regions with a single-pixel region; a 3rd region tells them apart.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # diagonal pair
    masks[0, 4, 4] = True  # a separate pixel, never detected
    maps = np.zeros((1, 5, 5))
    maps[0, 1, 1] = 1.0
    points = pro_curve(maps, masks)
    # 8-connected: regions {(1,1),(2,2)} and {(4,4)} -> PRO = (1/2 + 0) / 2 = 0.25
    assert points.pro[1] == pytest.approx(0.25, abs=1e-12)


def test_aupro_constant_map_is_half_the_limit() -> None:
    maps, masks = tied_maps(0)
    assert aupro(np.zeros_like(maps), masks, 0.3) == pytest.approx(0.15, abs=1e-12)


def test_aupro_perfect_and_inverted_maps() -> None:
    masks = _structured_case("many regions")
    rng = np.random.default_rng(2)
    perfect = rng.random(masks.shape) + 2.0 * masks
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(-perfect, masks) == pytest.approx(0.0, abs=1e-12)
    assert pixel_auroc(perfect, masks) == 1.0 and pixel_auroc(-perfect, masks) == 0.0


def test_aupro_weighs_regions_not_pixels() -> None:
    # A huge region found and a tiny one missed: PRO 1/2, while the pixel TPR is near 1.
    masks = np.zeros((1, 20, 20), dtype=bool)
    masks[0, :, :10] = True
    masks[0, 15, 15] = True
    maps = masks.astype(float)
    maps[0, 15, 15] = 0.0
    curve = pro_curve(maps, masks)
    assert curve.pro[1] == pytest.approx(0.5, abs=1e-12) and curve.fpr[1] == 0.0
    assert pixel_auroc(maps, masks) > 0.99


def test_pro_curve_is_monotone_and_integrates_to_aupro() -> None:
    maps, masks = tied_maps(7)
    curve = pro_curve(maps, masks)
    fprs, pros = reference_pro_points(maps, masks)
    np.testing.assert_allclose(curve.fpr, fprs, atol=1e-12)
    np.testing.assert_allclose(curve.pro, pros, atol=1e-12)
    np.testing.assert_array_equal(curve.thresholds[1:], np.unique(maps)[::-1])
    assert (np.diff(curve.fpr) >= 0).all() and (np.diff(curve.pro) >= 0).all()
    assert curve.fpr[-1] == 1.0 and curve.pro[-1] == pytest.approx(1.0, abs=1e-12)
    assert np.trapezoid(curve.pro, curve.fpr) == pytest.approx(aupro(maps, masks, 1.0), abs=1e-12)


def test_inputs_of_all_kinds_give_the_same_value() -> None:
    maps, masks = tied_maps(8)
    reference = aupro(maps, masks)
    as_tensors = aupro(torch.from_numpy(maps).float(), torch.from_numpy(masks))
    as_channel = aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None].double())
    single = aupro(maps[0], masks[0])
    assert as_tensors == pytest.approx(reference, abs=1e-12)
    assert as_channel == pytest.approx(reference, abs=1e-12)
    assert single == pytest.approx(reference_aupro(maps[:1], masks[:1]), abs=1e-6)


@CUDA
def test_cuda_equals_cpu() -> None:
    maps, masks = tied_maps(9, n=6, size=32)
    maps_t = torch.from_numpy(maps).float()
    for device_maps in (maps_t.cuda(),):
        assert aupro(device_maps, masks) == pytest.approx(aupro(maps_t, masks), abs=1e-12)
        assert aupro(device_maps.double(), torch.from_numpy(masks).cuda()) == pytest.approx(aupro(maps, masks), abs=1e-12)
        assert pixel_auroc(device_maps, masks) == pytest.approx(pixel_auroc(maps_t, masks), abs=1e-12)
        assert pixel_auroc(device_maps, masks, per_image=True) == pytest.approx(
            pixel_auroc(maps_t, masks, per_image=True), abs=1e-12)
    scores = torch.rand(100)
    labels = torch.rand(100) < 0.5
    assert image_auroc(scores.cuda(), labels.cuda()) == pytest.approx(image_auroc(scores, labels), abs=1e-12)


# ---------------------------------------------------------------- properties


score_maps = arrays(np.float64, (2, 5, 6), elements=st.integers(0, 8).map(float))
mask_arrays = arrays(np.bool_, (2, 5, 6))


def _usable(masks: np.ndarray) -> bool:
    return 0 < masks.sum() < masks.size


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(maps=score_maps, masks=mask_arrays.filter(_usable))
def test_metrics_are_invariant_to_increasing_transforms(maps: np.ndarray, masks: np.ndarray) -> None:
    transformed = maps**3 + 2.0 * maps - 7.0  # strictly increasing and exact on small integers
    assert aupro(transformed, masks) == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert pixel_auroc(transformed, masks) == pytest.approx(pixel_auroc(maps, masks), abs=1e-12)
    scores, labels = maps.reshape(-1), masks.reshape(-1)
    assert image_auroc(np.exp(scores), labels) == pytest.approx(image_auroc(scores, labels), abs=1e-12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(maps=score_maps, masks=mask_arrays.filter(_usable),
       fpr_limit=st.floats(0.01, 1.0, allow_nan=False))
def test_metrics_lie_in_the_unit_interval(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> None:
    assert 0.0 <= aupro(maps, masks, fpr_limit) <= 1.0
    assert 0.0 <= pixel_auroc(maps, masks) <= 1.0
    assert aupro(maps, masks, fpr_limit) == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=1e-6)


# ---------------------------------------------------------------- bad input


def test_masks_without_anomalous_pixel_are_rejected_by_aupro() -> None:
    with pytest.raises(ValueError, match=r"no anomalous pixel.*3 masks"):
        aupro(RNG.random((3, 8, 8)), np.zeros((3, 8, 8)))


def test_masks_without_normal_pixel_are_rejected_by_aupro() -> None:
    with pytest.raises(ValueError, match=r"no normal pixel.*FPR"):
        aupro(RNG.random((2, 4, 4)), np.ones((2, 4, 4)))


def test_shape_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"maps have shape \(2, 8, 8\).*masks have shape \(2, 8, 7\)"):
        aupro(RNG.random((2, 8, 8)), np.ones((2, 8, 7)))
    with pytest.raises(ValueError, match=r"scores have shape \(5,\).*labels have shape \(4,\)"):
        image_auroc(RNG.random(5), [0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"maps must have shape \(H, W\), \(N, H, W\) or \(N, 1, H, W\).*\(2, 3, 8, 8\)"):
        pixel_auroc(RNG.random((2, 3, 8, 8)), np.ones((2, 3, 8, 8)))


@pytest.mark.parametrize("metric", ["aupro", "pixel_auroc", "image_auroc"])
def test_non_finite_scores_are_rejected_with_counts(metric: str) -> None:
    maps = RNG.random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[:, 0, 0] = True
    maps[0, 1, 1] = np.nan
    maps[1, 2, 2] = np.inf
    maps[1, 3, 3] = -np.inf
    with pytest.raises(ValueError, match=r"1 NaN and 2 infinite values among 32"):
        if metric == "image_auroc":
            image_auroc(maps.ravel(), masks.ravel())
        else:
            {"aupro": aupro, "pixel_auroc": pixel_auroc}[metric](torch.from_numpy(maps), masks)


def test_empty_input_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"scores are empty"):
        image_auroc([], [])
    with pytest.raises(ValueError, match=r"maps are empty.*\(0, 8, 8\)"):
        aupro(np.zeros((0, 8, 8)), np.zeros((0, 8, 8)))


def test_single_class_labels_are_rejected_with_counts() -> None:
    with pytest.raises(ValueError, match=r"labels are all one class: 4 anomalous and 0 normal"):
        image_auroc(RNG.random(4), np.ones(4))
    with pytest.raises(ValueError, match=r"masks are all one class: 0 anomalous and 48 normal"):
        pixel_auroc(RNG.random((3, 4, 4)), np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match=r"none of the 2 images has both anomalous and normal pixels"):
        pixel_auroc(RNG.random((2, 4, 4)), np.stack([np.zeros((4, 4)), np.ones((4, 4))]), per_image=True)


def test_non_binary_masks_and_labels_are_rejected() -> None:
    masks = np.zeros((2, 4, 4))
    masks[0, 0, :2] = 0.5
    with pytest.raises(ValueError, match=r"masks must be binary.*2 values outside \{0, 1\}.*0.5"):
        aupro(RNG.random((2, 4, 4)), masks)
    with pytest.raises(ValueError, match=r"labels must be binary.*1 values outside \{0, 1\}.*2"):
        image_auroc([0.1, 0.2, 0.3], [0, 1, 2])


@pytest.mark.parametrize("fpr_limit", [0.0, -0.1, 1.5, float("nan")])
def test_fpr_limit_out_of_range_is_rejected(fpr_limit: float) -> None:
    maps, masks = tied_maps(0)
    with pytest.raises(ValueError, match=r"fpr_limit=.* expected a number in \(0, 1\]"):
        aupro(maps, masks, fpr_limit)


def test_non_numeric_input_is_rejected() -> None:
    with pytest.raises(TypeError, match=r"scores must be a numeric array or tensor.*"):
        image_auroc(["a", "b"], [0, 1])
    with pytest.raises(TypeError, match=r"max_points"):
        roc_curve([0.1, 0.2], [0, 1], max_points=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"max_points=1.*at least 2"):
        roc_curve([0.1, 0.2], [0, 1], max_points=1)
