"""Frozen backbones: the offline Lite0 weights, the three stages, and clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from skimage import data

import adcore.features as features
from adcore.features import (
    BackboneWeightsUnavailableError,
    FeatureExtractor,
    create_backbone,
    lite0_weights_path,
    remap_lite0_state_dict,
)


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor("tf_efficientnet_lite0", image_size=64)


def _imagenet_input(image) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5  # Lite0's normalisation: mean = std = 0.5


def test_lite0_keys_map_exactly_onto_timm() -> None:
    import timm

    original = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    remapped = remap_lite0_state_dict(original)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    own = model.state_dict()
    assert set(remapped) == set(own)
    assert all(remapped[k].shape == own[k].shape for k in own)
    assert "blocks.6.0.conv_pwl.weight" in remapped and "blocks.0.0.conv_pw.weight" in remapped


def test_lite0_remap_rejects_foreign_keys() -> None:
    with pytest.raises(KeyError, match="unexpected key"):
        remap_lite0_state_dict({"fc.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="block index 16"):
        remap_lite0_state_dict({"_blocks.16._bn0.weight": torch.zeros(1)})


def test_offline_lite0_classifies_imagenet_pictures() -> None:
    model = create_backbone("tf_efficientnet_lite0", features_only=False)
    with torch.no_grad():
        cat = model(_imagenet_input(data.chelsea())).argmax(1).item()
        coffee = model(_imagenet_input(data.coffee())).argmax(1).item()
    assert 281 <= cat <= 285  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee == 967  # espresso


def test_extractor_gives_three_frozen_stages(extractor: FeatureExtractor) -> None:
    assert extractor.channels == [40, 112, 320]
    assert extractor.reductions == [8, 16, 32]
    assert extractor.stage_sizes == [(8, 8), (4, 4), (2, 2)]
    extractor.train()
    assert not extractor.model.training  # batch norm stays frozen
    assert all(not p.requires_grad for p in extractor.parameters())
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    stages = extractor(images)
    assert [tuple(s.shape) for s in stages] == [(2, 40, 8, 8), (2, 112, 4, 4), (2, 320, 2, 2)]
    assert not any(s.requires_grad for s in stages)
    # features are deterministic (eval mode) and depend on the image
    again = extractor(images)
    assert torch.equal(stages[0], again[0])
    assert not torch.allclose(extractor(torch.rand(2, 3, 64, 64))[0], stages[0])


def test_extractor_rejects_images_of_the_wrong_shape(extractor: FeatureExtractor) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        extractor(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="built for 64x64"):
        extractor(torch.rand(2, 3, 96, 96))


@pytest.mark.parametrize("size", [16, 100])
def test_image_size_that_cannot_pool_to_three_stages(size: int) -> None:
    with pytest.raises(ValueError, match=r"multiple of 32"):
        FeatureExtractor("tf_efficientnet_lite0", image_size=size)


def test_unknown_backbone_lists_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'wide_resnet50'.*wide_resnet50_2"):
        create_backbone("wide_resnet50")


@pytest.mark.parametrize("name", ["wide_resnet50_2", "tf_efficientnet_b6"])
def test_downloadable_backbone_offline_says_how_to_get_it(name: str, monkeypatch) -> None:
    # No request may hang: offline mode, and no locally cached file is found.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(features, "_cached_hub_file", lambda repo_id: None)
    with pytest.raises(BackboneWeightsUnavailableError) as info:
        create_backbone(name)
    message = str(info.value)
    assert name in message and "pretrained=True" in message and "huggingface" in message
    assert "tf_efficientnet_lite0` works offline" in message


def test_missing_weights_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nothing.pth"
    with pytest.raises(BackboneWeightsUnavailableError, match="nothing.pth"):
        create_backbone("wide_resnet50_2", weights=missing)


def test_architecture_without_weights_builds_offline() -> None:
    model = create_backbone("wide_resnet50_2", pretrained=False)
    # CFlow-AD hooks layer2, layer3, layer4: strides 8, 16, 32
    assert model.feature_info.channels() == [512, 1024, 2048]
    assert model.feature_info.reduction() == [8, 16, 32]
    assert [info["module"] for info in model.feature_info.get_dicts()] == [
        "layer2", "layer3", "layer4"]
