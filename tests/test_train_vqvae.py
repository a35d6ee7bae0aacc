"""Tests of adcore.train.vqvae: exact resume, augmentation, epoch plans, error messages."""

from __future__ import annotations

import os

import pytest
import torch

from adcore.train.loop import CheckpointError, CheckpointMismatchError, NonFiniteLossError
from adcore.train.vqvae import (
    TrainHistory,
    VQVAETrainConfig,
    augment_batch,
    checkpoint_path,
    codeword_counts,
    epoch_plan,
    images_to_tensor,
    reset_dead_codewords,
    train_vqvae,
)
from adcore.vqvae import VQVAE

os.environ.setdefault("ADCORE_PROGRESS", "0")

TINY = dict(image_size=16, n_down=2, hidden_channels=8, embedding_dim=8, codebook_size=16,
            n_residual=1)


def _model(seed: int = 0, **kw) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(**{**TINY, **kw})


def _images(n: int = 10, channels: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return (torch.rand(n, channels, 16, 16, generator=g) * 255).to(torch.uint8)




CONFIG = VQVAETrainConfig(epochs=3, batch_size=4, lr=1e-3, images_per_epoch=12, augment=True,
                          check_every=2)


def test_resume_equals_uninterrupted_run(tmp_path):
    """k steps, checkpoint, resume to n steps -> the same weights as n steps in one go."""
    images = _images()
    straight = _model()
    history = train_vqvae(straight, images, CONFIG, device="cpu")
    assert history.steps[-1] == 9  # 3 epochs x 3 steps

    ckpt = tmp_path / "vqvae.pt"
    first = _model()
    part = train_vqvae(first, images, CONFIG, device="cpu", checkpoint=ckpt, max_steps=4)
    assert part.steps[-1] == 4 and ckpt.is_file()  # stopped inside epoch 2
    resumed = _model(seed=123)  # different init: everything must come from the checkpoint
    full = train_vqvae(resumed, images, CONFIG, device="cpu", checkpoint=ckpt)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert full.steps == history.steps
    assert full.loss == pytest.approx(history.loss)


def test_resume_between_checks_records_the_same_history(tmp_path, capsys, monkeypatch):
    """Killed after the checkpoint of step 3, checks every 2 steps: the loss sums pending since
    the check at step 2 travel in the file, so the resumed history is the uninterrupted one."""
    import adcore.train.vqvae as module

    config = VQVAETrainConfig(**{**CONFIG.to_dict(), "checkpoint_every": 3})
    images = _images()
    history = train_vqvae(_model(), images, config, device="cpu")
    ckpt = tmp_path / "vqvae.pt"
    real = module.save_checkpoint

    def save_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_vqvae(_model(), images, config, device="cpu", checkpoint=ckpt)
    monkeypatch.undo()
    full = train_vqvae(_model(seed=9), images, config, device="cpu", checkpoint=ckpt)
    assert "resuming from epoch 1 (step 3 of 9)" in capsys.readouterr().out
    assert full.steps == history.steps and full.loss == history.loss
    assert full.perplexity == history.perplexity and full.resumed_from_step == 3
    assert full.total_seconds >= full.seconds


def test_checkpoint_past_the_requested_stop_is_refused_and_kept(tmp_path):
    ckpt = tmp_path / "vqvae.pt"
    train_vqvae(_model(), _images(), CONFIG, device="cpu", checkpoint=ckpt)  # 9 steps
    written = ckpt.read_bytes()
    shorter = VQVAETrainConfig(**{**CONFIG.to_dict(), "epochs": 1})
    with pytest.raises(CheckpointError, match="at step 9, past the requested stop at step 3"):
        train_vqvae(_model(), _images(), shorter, device="cpu", checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="past the requested stop at step 5"):
        train_vqvae(_model(), _images(), CONFIG, device="cpu", checkpoint=ckpt, max_steps=5)
    assert ckpt.read_bytes() == written  # never rewritten backwards
    # asking for the same stop again trains nothing and leaves the file as it is
    again = train_vqvae(_model(), _images(), CONFIG, device="cpu", checkpoint=ckpt)
    assert again.resumed_from_step == 9 and ckpt.read_bytes() == written


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    ckpt = tmp_path / "vqvae.pt"
    train_vqvae(_model(), _images(), CONFIG, device="cpu", checkpoint=ckpt, max_steps=1)
    other = VQVAETrainConfig(**{**CONFIG.to_dict(), "lr": 5e-4})
    with pytest.raises(CheckpointMismatchError, match="train.lr: checkpoint has 0.001, expected 0.0005"):
        train_vqvae(_model(), _images(), other, device="cpu", checkpoint=ckpt)
    with pytest.raises(CheckpointMismatchError, match="model.codebook_size"):
        train_vqvae(_model(codebook_size=8), _images(), CONFIG, device="cpu", checkpoint=ckpt)
    with pytest.raises(CheckpointMismatchError, match="run.category: checkpoint has no such field, expected 'tile'"):
        train_vqvae(_model(), _images(), CONFIG, device="cpu", checkpoint=ckpt,
                    identity={"category": "tile"})


def test_training_lowers_the_loss_and_records_history():
    images = _images(8)
    config = VQVAETrainConfig(epochs=30, batch_size=4, lr=2e-3, check_every=5)
    history = train_vqvae(_model(), images, config, device="cpu")
    assert isinstance(history, TrainHistory)
    assert history.steps == list(range(5, 61, 5))
    assert history.loss[-1] < history.loss[0]
    assert all(1.0 <= p <= 16.0 for p in history.perplexity)
    assert all(0.0 < u <= 1.0 for u in history.usage)
    assert history.images_per_second > 0
    assert TrainHistory.from_dict(history.to_dict()) == history


def test_nan_loss_names_the_step():
    images = torch.rand(8, 3, 16, 16)
    images[3] = float("nan")
    config = VQVAETrainConfig(epochs=2, batch_size=4, check_every=100)
    with pytest.raises(NonFiniteLossError, match=r"non-finite VQ-VAE loss at step 1 .*lower the learning rate"):
        train_vqvae(_model(), images, config, device="cpu")


def test_bad_images_and_config():
    with pytest.raises(ValueError, match="1 channels"):
        train_vqvae(_model(), _images(channels=1), CONFIG, device="cpu")
    with pytest.raises(ValueError, match="expected \\(N, C, H, W\\)"):
        train_vqvae(_model(), torch.rand(3, 16, 16), CONFIG, device="cpu")
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 10 images"):
        train_vqvae(_model(), _images(), VQVAETrainConfig(batch_size=64), device="cpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        train_vqvae(_model(), _images(), VQVAETrainConfig(batch_size=2, cuda_graph=True), device="cpu")
    with pytest.raises(ValueError, match="lr=0"):
        VQVAETrainConfig(lr=0)
    with pytest.raises(ValueError, match="epochs=0"):
        VQVAETrainConfig(epochs=0)


def test_epoch_plan_is_seeded_and_covers_the_data():
    config = VQVAETrainConfig(images_per_epoch=25, seed=3)
    plan = epoch_plan(10, 0, config)
    assert plan["indices"].shape == (25,)
    counts = torch.bincount(plan["indices"], minlength=10)
    assert counts.min() >= 2 and counts.max() <= 3  # the set is repeated, then shuffled
    again = epoch_plan(10, 0, config)
    assert all(torch.equal(plan[k], again[k]) for k in plan)
    other = epoch_plan(10, 1, config)
    assert not torch.equal(plan["indices"], other["indices"])
    assert plan["angles"].abs().max() <= 15.0
    no_flip = epoch_plan(10, 0, VQVAETrainConfig(hflip=False, vflip=False))
    assert not no_flip["hflip"].any() and not no_flip["vflip"].any()


def test_augment_batch_flips_and_rotations():
    x = torch.rand(3, 2, 8, 8)
    no = torch.zeros(3, dtype=torch.bool)
    assert torch.allclose(augment_batch(x, no, no, torch.zeros(3)), x, atol=1e-6)
    flip = torch.tensor([True, False, True])
    out = augment_batch(x, flip, no, torch.zeros(3))
    assert torch.allclose(out[0], x[0].flip(-1), atol=1e-6) and torch.allclose(out[1], x[1], atol=1e-6)
    out = augment_batch(x, no, flip, torch.zeros(3))
    assert torch.allclose(out[2], x[2].flip(-2), atol=1e-6)
    out = augment_batch(x, no, no, torch.full((3,), 90.0))  # counter-clockwise quarter turn
    assert torch.allclose(out, torch.rot90(x, 1, (2, 3)), atol=1e-5)


def test_images_to_tensor():
    items = [{"image": torch.full((1, 4, 4), v)} for v in (0.0, 0.5, 1.0)]
    stacked = images_to_tensor(items)
    assert stacked.dtype == torch.uint8 and stacked.shape == (3, 1, 4, 4)
    assert stacked[:, 0, 0, 0].tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match="image 1 of the data set has shape \\(1, 5, 5\\)"):
        images_to_tensor([{"image": torch.zeros(1, 4, 4)}, {"image": torch.zeros(1, 5, 5)}])
    with pytest.raises(ValueError, match="empty"):
        images_to_tensor([])



def test_checkpoint_path_records_the_configuration(tmp_path):
    model = _model()
    path = checkpoint_path("ch03", model, CONFIG, tmp_path)
    assert path.parent == tmp_path and path.name.startswith("ch03-") and path.suffix == ".ckpt"
    assert checkpoint_path("ch03", _model(seed=9), CONFIG, tmp_path) == path  # weights don't count
    more_epochs = VQVAETrainConfig(**{**CONFIG.to_dict(), "epochs": 10, "check_every": 1})
    assert checkpoint_path("ch03", model, more_epochs, tmp_path) == path  # resumable: same file
    other_lr = VQVAETrainConfig(**{**CONFIG.to_dict(), "lr": 1e-4})
    assert checkpoint_path("ch03", model, other_lr, tmp_path) != path
    assert checkpoint_path("ch03", _model(codebook_size=8), CONFIG, tmp_path) != path


def test_finished_training_is_loaded_not_repeated(tmp_path):
    ckpt = tmp_path / "done.ckpt"
    first = train_vqvae(_model(), _images(), CONFIG, device="cpu", checkpoint=ckpt)
    again_model = _model(seed=5)
    again = train_vqvae(again_model, _images(), CONFIG, device="cpu", checkpoint=ckpt)
    assert again.steps == first.steps and again.loss == first.loss
    assert again.images_per_second == 0.0  # nothing trained in this call


# --------------------------------------------------------------------------- CUDA (lent GPU only)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_graph_step_equals_eager_step():
    """The captured step (warm-up undone) trains like the eager one (fp32, same batches)."""
    images = _images(16)
    base = dict(epochs=2, batch_size=4, lr=1e-3, augment=True, check_every=4, amp=False,
                channels_last=False)
    eager, graphed = _model().cuda(), _model().cuda()
    h1 = train_vqvae(eager, images, VQVAETrainConfig(**base), device="cuda")
    h2 = train_vqvae(graphed, images, VQVAETrainConfig(**base, cuda_graph=True), device="cuda")
    assert h1.steps == h2.steps
    assert h2.loss == pytest.approx(h1.loss, rel=1e-3, abs=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), graphed.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), name


@needs_cuda
def test_cuda_fast_path_trains_and_nan_is_caught():
    images = _images(16)
    config = VQVAETrainConfig(epochs=3, batch_size=4, lr=2e-3, check_every=4)  # bf16 + channels-last
    history = train_vqvae(_model().cuda(), images, config, device="cuda")
    assert all(torch.isfinite(torch.tensor(history.loss)))
    assert history.loss[-1] < history.loss[0]
    bad = images.float() / 255
    bad[5] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at step"):
        train_vqvae(_model().cuda(), bad, VQVAETrainConfig(epochs=1, batch_size=4, check_every=50),
                    device="cuda")


def test_reset_moves_dead_codewords_onto_encoder_outputs():
    model = _model(codebook_size=32)
    images = _images(4).float() / 255
    with torch.no_grad():
        model.quantizer.codebook[5:] = 1e3  # far from every encoder output: dead
    counts = codeword_counts(model, images).float()
    assert (counts[5:] == 0).all() and counts.sum() == 4 * 4 * 4
    optimizer = torch.optim.Adam(model.parameters())
    model.loss(images, model(images)).total.backward()
    optimizer.step()
    dead = counts == 0
    reset = reset_dead_codewords(model, images, counts, optimizer, torch.Generator().manual_seed(0))
    assert reset == int(dead.sum()) >= 27 and counts.sum() == 0  # counts start again
    codebook = model.quantizer.codebook.detach()
    z_e = model.eval().encode(images).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    # every reset codeword now sits exactly on one encoder output
    distances = torch.cdist(codebook[dead], z_e)
    assert distances.min(1).values.max() < 1e-3  # cdist rounds at about 1e-4
    state = optimizer.state[model.quantizer.codebook]
    assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
    assert (state["exp_avg_sq"][~dead] > 0).any()  # the live rows keep their moments
    assert (codeword_counts(model, images) > 0).sum() > 5


def test_training_with_resets_uses_more_codewords():
    images = _images(8)
    plain = VQVAETrainConfig(epochs=20, batch_size=4, lr=2e-3, check_every=5)
    with_resets = VQVAETrainConfig(epochs=20, batch_size=4, lr=2e-3, check_every=5,
                                   reset_dead_every=10)
    used = []
    for config in (plain, with_resets):
        model = _model(codebook_size=64)
        history = train_vqvae(model, images, config, device="cpu")
        used.append(int((codeword_counts(model, images) > 0).sum()))
    assert history.resets and all(step % 10 == 0 for step, _ in history.resets)
    assert used[1] > used[0]
    with pytest.raises(ValueError, match="reset_dead_every"):
        VQVAETrainConfig(reset_dead_every=0)
