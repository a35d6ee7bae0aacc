"""Tests of adcore.synth: the seeded, batched synthetic-anomaly generator and its sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adcore.data.cracks import crack_root
from adcore.synth import (
    AnomalySynthesizer,
    DefectSource,
    crack_sources,
    defect_source,
    sources_from_dataset,
    synthetic_sources,
)

SIZE = 48


def l_shape(height: int = 12, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """An asymmetric L-shaped dark defect on a bright, textured source image."""
    gen = torch.Generator().manual_seed(0)
    image = 0.8 + 0.1 * torch.rand(3, height, width, generator=gen)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[2:10, 2:4] = True
    mask[8:10, 2:7] = True
    image[:, mask] = 0.1
    return image, mask


def targets(batch: int = 4, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.4 + 0.2 * torch.rand(batch, 3, SIZE, SIZE, generator=gen)


def crop_to_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def test_outputs_are_exact_seeded_and_change_only_the_blend_region() -> None:
    source = defect_source(*l_shape(), name="L")
    synth = AnomalySynthesizer([source], seed=3)
    images = targets()
    out = synth(images)
    assert out.images.shape == images.shape and out.images.dtype == images.dtype
    assert out.masks.shape == (4, 1, SIZE, SIZE) and out.masks.dtype == torch.bool
    assert out.masks.flatten(1).any(1).all()                     # a defect in every image
    assert (out.regions | ~out.masks).all()                      # mask ⊆ blend region
    outside = ~out.regions.expand_as(images)
    assert torch.equal(out.images[outside], images[outside])
    darkening = (images - out.images).mean(1, keepdim=True)[out.masks]
    assert darkening.mean() > 0.2                                # the dark defect is there
    assert out.source_index.tolist() == [0, 0, 0, 0]
    again = AnomalySynthesizer([source], seed=3)(images)
    assert torch.equal(again.images, out.images) and torch.equal(again.masks, out.masks)
    other = AnomalySynthesizer([source], seed=4)(images)
    assert not torch.equal(other.masks, out.masks)
    assert not torch.equal(synth(images).masks, out.masks)       # the stream moves on


def test_rotation_flip_and_scale_act_on_the_mask() -> None:
    image, mask = l_shape()
    source = defect_source(image, mask)
    box = crop_to_box(mask.numpy())
    for rotation, flip, expected in (((0, 0), 0.0, box), ((90, 90), 0.0, np.rot90(box)),
                                     ((0, 0), 1.0, box[:, ::-1])):
        synth = AnomalySynthesizer([source], scale=(1, 1), rotation=rotation, flip=flip, seed=0)
        out = synth(targets(batch=3))
        for b in range(3):
            np.testing.assert_array_equal(crop_to_box(out.masks[b, 0].numpy()), expected)
    big = AnomalySynthesizer([source], scale=(2, 2), rotation=(0, 0), flip=0.0, seed=0)
    area = big(targets(batch=2)).masks.flatten(1).sum(1).float()
    assert ((area / mask.sum()) - 4).abs().max() < 0.6


def test_placement_restricted_to_the_foreground() -> None:
    source = defect_source(*l_shape())
    foreground = torch.zeros(4, 1, SIZE, SIZE, dtype=torch.bool)
    foreground[:, :, 30:40, 5:15] = True
    out = AnomalySynthesizer([source], seed=0)(targets(), foreground=foreground)
    for b in range(4):
        cy, cx = out.centres[b].round().long().tolist()
        assert foreground[b, 0, cy, cx]


def test_paste_and_mixed_blends() -> None:
    source = defect_source(*l_shape())
    images = targets()
    poisson = AnomalySynthesizer([source], seed=5)(images)
    paste = AnomalySynthesizer([source], seed=5, blend="paste")(images)
    mixed = AnomalySynthesizer([source], seed=5, guidance="mixed")(images)
    assert torch.equal(paste.masks, poisson.masks) and torch.equal(mixed.masks, poisson.masks)
    inside = poisson.masks.expand_as(images)
    assert (paste.images - poisson.images)[inside].abs().mean() > 0.05
    assert not torch.equal(mixed.images, poisson.images)
    # a naive paste copies the source pixels: the defect keeps its own brightness
    assert paste.images[inside].median() < 0.15


def test_several_sources_and_the_synthetic_defects() -> None:
    sources = synthetic_sources("concrete", count=3, image_size=64, seed=0)
    assert len(sources) == 3 and all(isinstance(s, DefectSource) for s in sources)
    assert all(s.mask.any() and s.image.shape[1:] == s.mask.shape for s in sources)
    out = AnomalySynthesizer(sources, scale=(0.5, 0.8), seed=1)(targets(batch=6))
    assert out.masks.flatten(1).any(1).all()
    assert set(out.source_index.tolist()) <= {0, 1, 2}


def test_sources_from_a_dataset_keep_the_anomalous_items() -> None:
    image, mask = l_shape()
    items = [{"image": image, "mask": torch.zeros(1, *mask.shape), "label": 0, "path": "good.png"},
             {"image": image, "mask": mask.float()[None], "label": 1, "path": "bad.png"}]
    sources = sources_from_dataset(items)
    assert [s.name for s in sources] == ["bad.png"]
    np.testing.assert_array_equal(crop_to_box(sources[0].mask.numpy()), crop_to_box(mask.numpy()))


def test_windowed_sources_cut_large_defects() -> None:
    image = torch.rand(3, 40, 200, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(40, 200, dtype=torch.bool)
    mask[20, 5:195] = True                                       # a long horizontal crack
    source = defect_source(image, mask)
    with pytest.raises(ValueError, match=r"larger than the target"):
        AnomalySynthesizer([source], scale=(1, 1))(targets())
    out = AnomalySynthesizer([source], scale=(1, 1), window=32, seed=0)(targets())
    assert out.masks.flatten(1).any(1).all()
    assert out.masks.flatten(1).sum(1).max() <= 32 * 1.5


@pytest.mark.skipif(crack_root() is None or not (crack_root() / "deepcrack").is_dir(),
                    reason="the real crack data (../shared/data/deepcrack) is absent")
def test_deepcrack_sources_paste_into_healthy_images() -> None:
    sources = crack_sources("deepcrack", scale=0.25, limit=3)
    assert len(sources) == 3
    out = AnomalySynthesizer(sources, window=40, seed=0)(targets(batch=2))
    assert out.masks.flatten(1).any(1).all()


def test_bad_inputs_raise_clear_errors() -> None:
    image, mask = l_shape()
    with pytest.raises(ValueError, match=r"source 'empty'.*empty mask"):
        defect_source(image, torch.zeros_like(mask), name="empty")
    with pytest.raises(ValueError, match=r"mask.*\(12, 8\).*\(12, 9\)"):
        defect_source(image, mask[:, :8])
    bad = image.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        defect_source(bad, mask)
    with pytest.raises(ValueError, match="at least one"):
        AnomalySynthesizer([])
    with pytest.raises(ValueError, match="scale"):
        AnomalySynthesizer([defect_source(image, mask)], scale=(0, 1))
    with pytest.raises(ValueError, match="blend"):
        AnomalySynthesizer([defect_source(image, mask)], blend="alpha")
    synth = AnomalySynthesizer([defect_source(image, mask)], seed=0)
    with pytest.raises(ValueError, match=r"3 channels.*1"):
        synth(targets()[:, :1])
    with pytest.raises(ValueError, match=r"larger than the target.*\(8, 8\)"):
        synth(targets()[..., :8, :8])
    bad_targets = targets()
    bad_targets[2, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite.*item 2"):
        synth(bad_targets)
    with pytest.raises(ValueError, match=r"foreground.*\(4, 1, 48, 48\)"):
        synth(targets(), foreground=torch.ones(4, 1, 40, 48, dtype=torch.bool))
    empty_region = torch.ones(4, 1, SIZE, SIZE, dtype=torch.bool)
    empty_region[1] = False
    with pytest.raises(ValueError, match=r"item 1.*placement region.*zero area"):
        synth(targets(), foreground=empty_region)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        synth(targets()[0])


def test_defect_touching_its_source_border_is_still_pasted() -> None:
    # A one-pixel defect in the corner of its source used to vanish (empty mask, unchanged image).
    image = torch.rand(3, 3, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[0, 0] = True
    source = defect_source(image, mask, "corner")
    assert source.mask.shape[0] > 3 and source.mask.shape[1] > 3  # padded to keep a margin
    out = AnomalySynthesizer([source], seed=0)(torch.rand(4, 3, 32, 32))
    assert bool(out.masks.flatten(1).any(1).all())
