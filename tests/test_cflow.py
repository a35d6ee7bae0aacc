"""CFlow-AD: scoring (Eq. 4), the fiber trainer against the reference loop, schedules, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adcore.cflow import (
    CFlowConfig,
    CFlowModel,
    anomaly_maps_from_log_likelihoods,
    combine_stage_scores,
    stage_anomaly_scores,
)
from adcore.flows import positional_encoding_2d
from adcore.losses import flow_loss, log_likelihood
from adcore.train.cflow import (
    CFlowTrainConfig,
    FiberPair,
    FiberTrainer,
    cflow_learning_rate,
    evaluate_images,
    step_learning_rate,
    train_cflow,
)
from adcore.train.loop import NonFiniteLossError

SIZE = 64  # Lite0 stages: 8x8, 4x4, 2x2




def _model(seed: int = 0, **overrides) -> CFlowModel:
    torch.manual_seed(seed)
    config = CFlowConfig(image_size=SIZE, condition_channels=16, coupling_blocks=2, **overrides)
    return CFlowModel(config, pretrained=False, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def features() -> list[list[torch.Tensor]]:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    return [model.features(torch.rand(4, 3, SIZE, SIZE, generator=generator)) for _ in range(2)]


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        mask = torch.zeros(1, SIZE, SIZE)
        if index % 2:
            mask[:, 20:30, 20:30] = 1.0
        return {"image": self.images[index], "mask": mask, "label": index % 2}


# ------------------------------------------------------------------ scoring (Eq. 4)
def test_stage_scores_are_eq4_on_normalised_per_dimension_likelihood() -> None:
    channels = [2, 4]
    log_p = [torch.tensor([[[-2.0, -4.0]]]), torch.tensor([[[-8.0, 0.0]]])]
    scores = stage_anomaly_scores(log_p, channels, reference=[-1.0, -1.0])
    # stage 0: log p / C = -1, -2 -> 1 - exp(0), 1 - exp(-1)
    assert torch.allclose(scores[0], torch.tensor([[[0.0, 1 - math.exp(-1)]]]))
    # stage 1: -2 -> 1 - exp(-1); 0 is above the reference -1: as normal as it gets
    assert torch.allclose(scores[1], torch.tensor([[[1 - math.exp(-1), 0.0]]]))
    # CFlow-AD's test-set normalisation: the most likely fiber scores exactly 0
    test_max = stage_anomaly_scores(log_p, channels)
    assert test_max[1].min() == 0 and test_max[0][0, 0, 0] == 0


def test_stage_scores_reject_bad_references() -> None:
    with pytest.raises(ValueError, match="finite"):
        stage_anomaly_scores([torch.zeros(1, 2, 2)], [3], reference=[float("nan")])
    with pytest.raises(ValueError, match="1 stages"):
        stage_anomaly_scores([torch.zeros(1, 2, 2)], [3], reference=[0.0, 0.0])


def test_combination_by_product_and_sum() -> None:
    a = torch.full((2, 4, 4), 0.5)
    b = torch.full((2, 2, 2), 0.2)
    product = combine_stage_scores([a, b], 8, "product")
    total = combine_stage_scores([a, b], 8, "sum")
    assert product.shape == (2, 8, 8)
    assert torch.allclose(product, torch.full((2, 8, 8), 0.1))
    assert torch.allclose(total, torch.full((2, 8, 8), 0.7))
    with pytest.raises(ValueError, match="how must be"):
        combine_stage_scores([a], 8, "max")


def test_maps_localise_the_least_likely_region_and_image_score_is_max() -> None:
    low = torch.zeros(3, 4, 4)
    low[1, 1, 2] = -50.0  # one unlikely fiber in image 1
    maps, scores = anomaly_maps_from_log_likelihoods([low, low[:, ::2, ::2]], [10, 10], 16,
                                                     reference=[0.0, 0.0], how="sum")
    assert maps.shape == (3, 16, 16)
    assert scores.argmax().item() == 1
    assert torch.allclose(scores, maps.flatten(1).amax(1))
    peak = divmod(int(maps[1].argmax()), 16)
    assert abs(peak[0] - 5) <= 1 and abs(peak[1] - 10) <= 1  # (1, 2) of 4x4 -> (5, 10) of 16x16


def test_config_rejects_unknown_choices() -> None:
    with pytest.raises(ValueError, match="combine"):
        CFlowConfig(combine="mean")
    with pytest.raises(ValueError, match="normalization"):
        CFlowConfig(normalization="test")


def test_model_needs_normalisation_before_scoring_alone() -> None:
    model = _model()
    with pytest.raises(ValueError, match="fit_normalization"):
        model.anomaly_maps(torch.rand(1, 3, SIZE, SIZE))
    images = torch.rand(3, 3, SIZE, SIZE)
    constants = model.fit_normalization([images[:2], images[2:]])
    log_p = model.log_likelihood_maps(images)
    expected = [max(float((p / c).max()) for p in [lp]) for lp, c in zip(log_p, model.channels)]
    assert torch.allclose(constants, torch.tensor(expected), atol=1e-5)
    maps, scores = model.anomaly_maps(images)
    assert maps.shape == (3, SIZE, SIZE) and float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_normalization_setting_decides_how_the_model_scores() -> None:
    """``CFlowConfig.normalization``: training constants, or the maximum over the scored images."""
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    test_max = _model(normalization="test_max")
    # the test-set maximum needs no training constants
    maps, scores = test_max.anomaly_maps(images)
    log_p = test_max.log_likelihood_maps(images)
    expected, expected_scores = anomaly_maps_from_log_likelihoods(log_p, test_max.channels, SIZE,
                                                                  reference=None)
    assert torch.equal(maps, expected) and torch.equal(scores, expected_scores)
    train = _model(normalization="train")
    train.fit_normalization([images[:1]])  # constants from one image: the others differ
    trained_maps, _ = train.anomaly_maps(images)
    assert not torch.allclose(trained_maps, maps)
    by_reference, _ = anomaly_maps_from_log_likelihoods(
        train.log_likelihood_maps(images), train.channels, SIZE, reference=train.normalization)
    assert torch.equal(trained_maps, by_reference)


def test_runner_main_metrics_follow_the_model_configuration() -> None:
    from adcore.repro.cflow import score_variants

    generator = torch.Generator().manual_seed(4)
    log_p = [-torch.rand(6, 4, 4, generator=generator) * 50 for _ in range(2)]
    masks = torch.zeros(6, 8, 8)
    masks[3:, 2:5, 2:5] = 1
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    reference = torch.tensor([-0.5, -0.4])
    metrics, variants = score_variants(log_p, [4, 4], 8, reference, masks, labels,
                                       main=("sum", "test_max"))
    assert metrics == variants["cflow_ad"]  # the variant of the same scoring
    with pytest.raises(ValueError, match="normalization"):
        score_variants(log_p, [4, 4], 8, reference, masks, labels, main=("sum", "test"))


def test_stage_log_likelihoods_do_not_depend_on_chunking(features) -> None:
    model = _model()
    whole = model.stage_log_likelihoods(features[0])
    chunked = model.stage_log_likelihoods(features[0], chunk=7)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole, chunked))
    assert [tuple(m.shape) for m in whole] == [(4, 8, 8), (4, 4, 4), (4, 2, 2)]


# ------------------------------------------------------------------ the reference loop
def _reference_decoders(model: CFlowModel) -> nn.ModuleList:
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")

    def subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(),
                             nn.Linear(2 * dims_in, dims_out))

    decoders = nn.ModuleList()
    for flow in model.flows:
        coder = Ff.SequenceINN(flow.channels)
        for _ in flow.blocks:
            coder.append(Fm.AllInOneBlock, cond=0, cond_shape=(flow.condition_channels,),
                         subnet_constructor=subnet_fc, affine_clamping=1.9,
                         global_affine_type="SOFTPLUS", permute_soft=True)
        coder.load_state_dict({"module_list." + k[len("blocks."):]: v
                               for k, v in flow.state_dict().items()})
        decoders.append(coder)
    return decoders


def _reference_batch(decoders, optimizer, features, n_fibers, condition_vec, generator, kind):
    """CFlow-AD's ``train_meta_epoch`` fiber loop for one image batch."""
    for layer, e in enumerate(features):
        B, C, H, W = e.size()
        S, E = H * W, B * H * W
        p = positional_encoding_2d(condition_vec, H, W).unsqueeze(0).repeat(B, 1, 1, 1)
        c_r = p.reshape(B, condition_vec, S).transpose(1, 2).reshape(E, condition_vec)
        e_r = e.reshape(B, C, S).transpose(1, 2).reshape(E, C)
        perm = torch.randperm(E, generator=generator)
        for f in range(E // n_fibers):
            idx = torch.arange(f * n_fibers, (f + 1) * n_fibers)
            z, log_jac_det = decoders[layer](e_r[perm[idx]], [c_r[perm[idx]]])
            log_prob = C * -0.9189385332046727 - 0.5 * torch.sum(z ** 2, 1) + log_jac_det
            loss = -F.logsigmoid(log_prob / C).mean() if kind == "logsigmoid" else (
                0.5 * torch.sum(z ** 2, 1) - log_jac_det).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _train_both(features, kind: str, fast: bool) -> tuple[list, list, list]:
    """Train adcore's trainer and the reference loop from the same weights on the same fibers."""
    model = _model()
    decoders = _reference_decoders(model)
    reference_optimizer = torch.optim.Adam(decoders.parameters(), lr=1e-3)
    reference_generator = torch.Generator().manual_seed(0)
    trainer = FiberTrainer(model, lr=1e-3, fiber_batch=16, loss=kind, seed=0)
    if not fast:  # the readable blocks and the textbook Adam: the same floating-point operations
        for flow in model.flows:
            flow.fused = False
        trainer.optimizer = torch.optim.Adam(model.flows.parameters(), lr=1e-3)
    for batch in features:
        _reference_batch(decoders, reference_optimizer, batch, 16, 16, reference_generator, kind)
        losses = trainer.train_batch(batch)
    assert [loss.numel() for loss in losses] == [16, 4, 1]
    assert trainer.steps == [32, 8, 2]
    ours = [p.detach() for p in model.flows.parameters()]
    theirs = [p.detach() for d in decoders for p in d.parameters() if p.requires_grad]
    initial = [p.detach() for p in _model().flows.parameters()]
    assert len(ours) == len(theirs) == len(initial)
    return ours, theirs, initial


@pytest.mark.parametrize("kind", ["logsigmoid", "nll"])
def test_trainer_takes_exactly_the_reference_code_steps(features, kind: str) -> None:
    ours, theirs, initial = _train_both(features, kind, fast=False)
    assert max(float((p - q).abs().max()) for p, q in zip(ours, initial)) > 1e-3  # it trained
    assert all(torch.equal(p, q) for p, q in zip(ours, theirs))  # bit for bit


def test_fast_path_takes_the_same_steps_up_to_rounding(features) -> None:
    ours, theirs, _ = _train_both(features, "logsigmoid", fast=True)
    differences = torch.cat([(p - q).abs().flatten() for p, q in zip(ours, theirs)])
    # Fused kernels round differently; Adam amplifies that only for weights whose gradient
    # is ~0 (m / sqrt(v) of rounding noise), a fraction of one step of lr = 1e-3.
    assert torch.quantile(differences, 0.999) < 1e-5
    assert differences.max() < 5e-4


def test_stage_threads_take_the_same_steps_as_sequential_stages(features) -> None:
    models = [_model(), _model()]
    trainers = [FiberTrainer(models[0], fiber_batch=8, seed=2),
                FiberTrainer(models[1], fiber_batch=8, seed=2, stage_threads=3)]
    for batch in features:
        losses = [trainer.train_batch(batch, 1e-3) for trainer in trainers]
        assert all(torch.equal(a, b) for a, b in zip(*losses))
    assert trainers[0].steps == trainers[1].steps == [64, 16, 4]
    # each stage is stepped by the one Adam, every parameter as often as its stage
    assert all(torch.equal(p, q) for p, q in zip(models[0].flows.parameters(),
                                                  models[1].flows.parameters()))
    state = trainers[1].optimizer.state
    assert [int(state[flow.blocks[0].global_scale]["step"]) for flow in models[1].flows] == [
        64, 16, 4]
    with pytest.raises(ValueError, match="stage_threads must be >= 1"):
        FiberTrainer(_model(), stage_threads=0)


def test_trainer_rejects_a_fiber_batch_larger_than_the_positions(features) -> None:
    trainer = FiberTrainer(_model(), fiber_batch=32)
    with pytest.raises(ValueError, match=r"N=32 is larger than the 16 positions of stage 2"):
        trainer.train_batch(features[0])


def test_trainer_rejects_mismatched_inputs(features) -> None:
    trainer = FiberTrainer(_model(), fiber_batch=8)
    with pytest.raises(ValueError, match="3 feature stages"):
        trainer.train_batch(features[0][:2])
    with pytest.raises(ValueError, match="go together"):
        trainer.train_batch(features[0], augmented=features[1])
    masks = [torch.zeros(4, 8, 8), torch.zeros(4, 4, 4), torch.zeros(4, 3, 3)]
    with pytest.raises(ValueError, match=r"mask of stage 2"):
        trainer.train_batch(features[0], augmented=features[1], masks=masks)
    with pytest.raises(ValueError, match="CUDA graphs need"):
        FiberTrainer(_model(), use_graphs=True)
    with pytest.raises(ValueError, match="loss must be"):
        FiberTrainer(_model(), loss="mse")


def test_contrastive_hook_sees_real_and_augmented_fibers_at_the_same_positions(features) -> None:
    model = _model()
    seen: list[FiberPair] = []

    def contrastive(pair: FiberPair) -> torch.Tensor:
        seen.append(pair)
        return 0.0 * pair.log_p_aug.mean()

    masks = [torch.rand(4, *size) for size in model.stage_sizes]
    trainer = FiberTrainer(model, fiber_batch=8, seed=3)
    trainer.train_batch(features[0], augmented=features[0], masks=masks, contrastive=contrastive)
    assert len(seen) == 32 + 8 + 2
    pair = seen[-1]
    assert pair.stage == 2 and pair.n_channels == 320 and pair.z_real.shape == (8, 320)
    assert pair.mask.shape == (8,)
    # identical inputs at the same positions: identical likelihoods, masks of those positions
    assert torch.allclose(pair.log_p_real, pair.log_p_aug, atol=1e-4)
    assert set(pair.mask.tolist()) <= set(masks[2].flatten().tolist())
    # with a zero contrastive term the steps equal plain training
    plain = _model()
    FiberTrainer(plain, fiber_batch=8, seed=3).train_batch(features[0])
    difference = max(float((p - q).detach().abs().max())
                     for p, q in zip(model.flows.parameters(), plain.flows.parameters()))
    assert difference < 1e-5


def test_contrastive_term_changes_the_gradient(features) -> None:
    model = _model()
    masks = [torch.ones(4, *size) for size in model.stage_sizes]
    trainer = FiberTrainer(model, fiber_batch=8, seed=3)
    trainer.train_batch(features[0], augmented=features[1], masks=masks,
                        contrastive=lambda pair: pair.log_p_aug.mean())
    plain = _model()
    FiberTrainer(plain, fiber_batch=8, seed=3).train_batch(features[0])
    difference = max(float((p - q).detach().abs().max())
                     for p, q in zip(model.flows.parameters(), plain.flows.parameters()))
    assert difference > 1e-4


def test_step_loss_is_the_flow_loss_of_eq3(features) -> None:
    model = _model()
    trainer = FiberTrainer(model, fiber_batch=16, loss="nll")
    fibers = model.fibers(features[0][1])[:16]
    condition = model.condition(1)[:16]
    loss = trainer._step_loss(1, fibers, condition, None, None, None)
    z, log_det = model.flows[1](fibers, condition)
    expected = flow_loss(log_likelihood(z, log_det), 112, "nll")
    assert torch.allclose(loss, expected)
    assert torch.allclose(expected, (0.5 * z.square().sum(1) - log_det).mean(), atol=1e-3)


# ------------------------------------------------------------------ schedules and loop
def test_paper_step_schedule() -> None:
    values = [step_learning_rate(e) for e in (0, 49, 50, 74, 75, 90, 199)]
    assert values == pytest.approx([2e-4, 2e-4, 2e-5, 2e-5, 2e-6, 2e-7, 2e-7])


def test_cflow_warmup_and_cosine_schedule() -> None:
    lr, epochs = 2e-4, 25
    assert cflow_learning_rate(0, 0, 10) == pytest.approx(lr / 10)
    eta_min = lr * 0.1 ** 3
    cosine_at_2 = eta_min + (lr - eta_min) * (1 + math.cos(math.pi * 2 / epochs)) / 2
    # the warm-up ends where the cosine takes over
    assert cflow_learning_rate(1, 9, 10) == pytest.approx(
        lr / 10 + (19 / 20) * (cosine_at_2 - lr / 10))
    assert cflow_learning_rate(2, 0, 10) == pytest.approx(cosine_at_2)
    assert cflow_learning_rate(24, 5, 10) < cflow_learning_rate(10, 5, 10) < cosine_at_2
    config = CFlowTrainConfig.cflow_ad()
    assert (config.epochs, config.sub_epochs, config.batch_size, config.flow_loss) == (
        25, 8, 32, "logsigmoid")
    assert config.learning_rate(2, 0, 10) == pytest.approx(cosine_at_2)


@pytest.mark.parametrize("field,value", [("schedule", "linear"), ("flow_loss", "mse"),
                                         ("epochs", 0), ("fiber_batch", 0), ("lr", -1.0)])
def test_train_config_rejects_bad_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        CFlowTrainConfig(**{field: value})


def test_train_cflow_end_to_end_and_evaluation() -> None:
    model = _model()
    images = torch.rand(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    dataset = _Images(images)
    config = CFlowTrainConfig(epochs=2, batch_size=4, fiber_batch=16, check_every=1)
    history = train_cflow(model, dataset, config, show_progress=False)
    assert history["steps"] == [2 * 2 * 16, 2 * 2 * 4, 2 * 2 * 1]
    assert len(history["loss"]) == 2 and len(history["loss"][0]) == 3
    assert torch.isfinite(model.normalization).all()
    result = evaluate_images(model, dataset, batch_size=3)
    assert [tuple(m.shape) for m in result["log_p"]] == [(8, 8, 8), (8, 4, 4), (8, 2, 2)]
    assert result["masks"].shape == (8, SIZE, SIZE) and result["labels"].tolist() == [0, 1] * 4


def test_non_finite_likelihood_stops_with_stage_and_step() -> None:
    model = _model()
    images = torch.rand(8, 3, SIZE, SIZE)
    images[4:] = float("nan")  # the second image batch (no shuffling effect on NaN count)
    config = CFlowTrainConfig(epochs=1, batch_size=8, fiber_batch=16, check_every=1)
    with pytest.raises(NonFiniteLossError, match=r"stage 0 at its optimizer step 0.*lower "
                                                   r"learning rate"):
        train_cflow(model, _Images(images), config, show_progress=False)


def test_train_cflow_needs_a_full_batch() -> None:
    with pytest.raises(ValueError, match="fewer than one batch"):
        train_cflow(_model(), _Images(torch.rand(3, 3, SIZE, SIZE)),
                    CFlowTrainConfig(batch_size=4), show_progress=False)


# ------------------------------------------------------------------ CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_takes_the_same_steps_as_eager() -> None:
    generator = torch.Generator().manual_seed(5)
    batches = [torch.rand(4, 3, SIZE, SIZE, generator=generator) for _ in range(4)]
    results = []
    for graphs in (False, True):
        model = _model().cuda()
        trainer = FiberTrainer(model, fiber_batch=16, use_graphs=graphs, seed=0)
        for index, images in enumerate(batches):
            losses = trainer.train_batch(model.features(images.cuda()), lr=2e-4 / (1 + index))
        torch.cuda.synchronize()
        results.append(([p.detach().cpu() for p in model.flows.parameters()],
                        [loss.cpu() for loss in losses]))
        if graphs:
            assert len(trainer._graphs) == 3  # captured after the first (eager) batch
    (eager, eager_losses), (graphed, graphed_losses) = results
    assert max(float((a - b).abs().max()) for a, b in zip(eager, graphed)) < 1e-5
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(eager_losses, graphed_losses))
