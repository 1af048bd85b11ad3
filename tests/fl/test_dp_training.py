import pytest
import torch
import torch.nn.functional as F

from fl import training
from fl.models import build_model
from fl.privacy import DPConfig, SecretNoise, SeededNoise, StepPlan, clip_per_sample, noisy_sum
from fl.training import TrainConfig, evaluate, subspace_projection, train_local_dp
from tests.fl.synthetic import synthetic_split


def _one_step_by_hand_and_by_train_local_dp(augmentations: int):
    """(trained, expected) weights after one full-batch DP step on 12 records:
    expected from per-record gradients taken one example at a time with
    autograd (the mean over the record's copies), clipped and noised by hand."""
    data = synthetic_split(12, seed=0)
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dp = DPConfig("gaussian", epsilon=5.0, clip=0.5, max_participations=1)
    plan = StepPlan(sample_rate=1.0, steps=1, noise_multiplier_or_eps0=1.3, noise_scale=0.65)
    cfg = TrainConfig(batch_size=12, lr=0.1, momentum=0.0, augmentations=augmentations)
    g = torch.Generator().manual_seed(7)  # masks and shifts
    n = torch.Generator().manual_seed(8)  # noise (q = 1: no Poisson draw)
    copies = [data.x]
    if augmentations > 1:  # then the step's shifts, one [12, 2] set per extra copy
        shifts = training.random_shifts(augmentations - 1, 12, g)
        copies += [training.shift_images(data.x, s) for s in shifts]

    def grad_of(x1, y1):
        model.zero_grad()
        F.cross_entropy(model(x1), y1).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    per_record = torch.stack(
        [
            sum(grad_of(c[i : i + 1], data.y[i : i + 1]) for c in copies) / len(copies)
            for i in range(12)
        ]
    )
    clipped = clip_per_sample(per_record, norm="l2", bound=0.5)
    noised = noisy_sum(clipped, mechanism="gaussian", scale=0.65, noise=SeededNoise(n))
    expected = before - 0.1 * noised / 15  # divided by the released count, not the 12 records
    train_local_dp(
        model,
        data.x,
        data.y,
        config=cfg,
        dp=dp,
        plan=plan,
        released_records=15,
        noise=SeededNoise(torch.Generator().manual_seed(8)),
        generator=torch.Generator().manual_seed(7),
    )
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), expected


def test_one_dp_step_matches_a_hand_written_per_sample_loop():
    # Prepare, execute: full batch (q=1), one step, no momentum, an MLP (no dropout)
    got, expected = _one_step_by_hand_and_by_train_local_dp(augmentations=1)
    # Assert
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_dp_training_with_little_noise_learns():
    data = synthetic_split(300, seed=1)
    model = build_model("cnn", generator=torch.Generator().manual_seed(0))
    dp = DPConfig("gaussian", epsilon=1e4, clip=1.0, max_participations=1)
    plan = StepPlan(sample_rate=0.1, steps=60, noise_multiplier_or_eps0=0.01, noise_scale=0.01)
    before, _ = evaluate(model, data.x, data.y)
    train_local_dp(
        model,
        data.x,
        data.y,
        config=TrainConfig(lr=0.5, momentum=0.5),
        dp=dp,
        plan=plan,
        released_records=300,
        noise=SecretNoise(),
        generator=torch.Generator().manual_seed(3),
    )
    after, acc = evaluate(model, data.x, data.y)
    assert after < before
    assert acc > 0.5


def _trained_twice(data, dp, plan, model_name, noise):
    """Flat parameters after two trainings from the same model, plan and public
    generator seed; ``noise()`` gives each training its noise source."""
    results = []
    for _ in range(2):
        model = build_model(model_name, generator=torch.Generator().manual_seed(0))
        train_local_dp(
            model,
            data.x,
            data.y,
            config=TrainConfig(),
            dp=dp,
            plan=plan,
            released_records=len(data.y),
            noise=noise(),
            generator=torch.Generator().manual_seed(4),
        )
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return results


def test_dp_training_with_seeded_noise_is_deterministic_and_leaves_global_rng_alone():
    # Prepare
    dp = DPConfig("laplace", epsilon=10.0, clip=1.0, max_participations=2)
    plan = StepPlan(sample_rate=0.2, steps=3, noise_multiplier_or_eps0=1.0, noise_scale=1.0)
    state = torch.get_rng_state()
    # Execute
    first, second = _trained_twice(
        synthetic_split(50, seed=2),
        dp,
        plan,
        "cnn",
        lambda: SeededNoise(torch.Generator().manual_seed(5)),
    )
    # Assert
    assert torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


def test_dp_training_with_secret_noise_differs_every_time():
    # Prepare
    dp = DPConfig("gaussian", epsilon=10.0, clip=1.0, max_participations=1)
    plan = StepPlan(sample_rate=1.0, steps=1, noise_multiplier_or_eps0=1.0, noise_scale=1.0)
    # Execute
    first, second = _trained_twice(synthetic_split(20, seed=2), dp, plan, "mlp", SecretNoise)
    # Assert
    assert not torch.allclose(first, second)


def test_subspace_training_moves_only_within_the_public_subspace():
    # Prepare
    data = synthetic_split(40, seed=3)
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    proj = subspace_projection(
        params=before.numel(), dim=8, generator=torch.Generator().manual_seed(5)
    )
    dp = DPConfig("laplace", epsilon=10.0, clip=1.0, max_participations=1)
    plan = StepPlan(sample_rate=1.0, steps=2, noise_multiplier_or_eps0=5.0, noise_scale=0.2)
    # Execute
    train_local_dp(
        model,
        data.x,
        data.y,
        config=TrainConfig(lr=0.5, momentum=0.5),
        dp=dp,
        plan=plan,
        released_records=40,
        noise=SecretNoise(),
        generator=torch.Generator().manual_seed(6),
        projection=proj,
    )
    # Assert: the change is P @ c for some c (least-squares residual ~ 0), and not zero
    change = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - before
    coef = torch.linalg.lstsq(proj.double(), change.double().unsqueeze(1)).solution
    residual = change.double() - (proj.double() @ coef).squeeze(1)
    assert change.norm() > 1e-3
    assert residual.norm() < 1e-3 * change.norm()  # float32 rounding of the weights


@pytest.mark.parametrize("augmentations", [1, 3])
@pytest.mark.parametrize("chunk", [1, 7, 1_000])
def test_per_sample_chunking_changes_nothing_but_rounding(monkeypatch, chunk, augmentations):
    # Prepare: a CNN (dropout masks are sliced per chunk too), Gaussian, q=0.8,
    # 2 steps; with augmented copies the shifts are sliced per chunk as well
    data = synthetic_split(30, seed=5)
    dp = DPConfig("gaussian", epsilon=10.0, clip=0.7, max_participations=2)
    plan = StepPlan(sample_rate=0.8, steps=2, noise_multiplier_or_eps0=1.1, noise_scale=0.77)

    def trained(chunk_size):
        monkeypatch.setattr(training, "PER_SAMPLE_CHUNK", chunk_size)
        model = build_model("cnn", generator=torch.Generator().manual_seed(0))
        stats = train_local_dp(
            model,
            data.x,
            data.y,
            config=TrainConfig(batch_size=24, lr=0.5, momentum=0.5, augmentations=augmentations),
            dp=dp,
            plan=plan,
            released_records=30,
            noise=SeededNoise(torch.Generator().manual_seed(10)),
            generator=torch.Generator().manual_seed(9),
        )
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), stats

    # Execute: the whole batch at once (reference) and in chunks of `chunk`
    whole, whole_stats = trained(10_000)
    parts, parts_stats = trained(chunk)
    # Assert
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)
    assert parts_stats.samples == whole_stats.samples > 0
    assert parts_stats.mean_loss == pytest.approx(whole_stats.mean_loss, rel=1e-5)


def test_no_dropout_draws_no_masks_and_changes_the_update():
    # Prepare: the paper CNN has dropout; the same data, plan and generator seed
    data = synthetic_split(20, seed=6)
    dp = DPConfig("gaussian", epsilon=10.0, clip=1.0, max_participations=1)
    plan = StepPlan(sample_rate=1.0, steps=1, noise_multiplier_or_eps0=1.0, noise_scale=1.0)

    def trained(dropout):
        model = build_model("cnn", generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(3)
        cfg = TrainConfig(batch_size=20, lr=0.1, momentum=0.0, dropout=dropout)
        noise = SeededNoise(torch.Generator().manual_seed(4))
        train_local_dp(
            model,
            data.x,
            data.y,
            config=cfg,
            dp=dp,
            plan=plan,
            released_records=20,
            noise=noise,
            generator=gen,
        )
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]), gen.get_state()

    # Execute
    with_dropout, state_with = trained(True)
    without, state_without = trained(False)
    # Assert: without dropout the generator drew nothing (the noise has its
    # own source), and the step differs
    assert not torch.equal(state_with, state_without)
    assert not torch.allclose(with_dropout, without)
    again, _ = trained(False)
    assert torch.equal(again, without)


def test_shift_images_moves_pixels_and_fills_black():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).reshape(2, 1, 5, 6)
    shifts = torch.tensor([[0, 0], [1, -2]])
    out = training.shift_images(x, shifts)
    assert torch.equal(out[0], x[0])  # (0, 0) leaves the image alone
    # (1 down, 2 left): out[r, c] = x[r - 1, c + 2]; the top row and the two
    # rightmost columns come from outside the image, so they are black.
    assert torch.equal(out[1, 0, 1:, :4], x[1, 0, :4, 2:])
    assert torch.all(out[1, 0, 0, :] == training.BLACK)
    assert torch.all(out[1, 0, :, 4:] == training.BLACK)
    with pytest.raises(ValueError, match="within"):
        training.shift_images(x, torch.tensor([[0, 0], [training.MAX_SHIFT + 1, 0]]))


def test_augmented_step_clips_the_mean_gradient_over_each_records_copies():
    # Prepare, execute: as above, with 3 copies of each record (itself and two shifts)
    got, expected = _one_step_by_hand_and_by_train_local_dp(augmentations=3)
    # Assert
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_augmentations_must_be_positive():
    with pytest.raises(ValueError, match="augmentations must be >= 1"):
        TrainConfig(augmentations=0)
