import torch

from fl.models import build_model
from fl.training import TrainConfig, evaluate, train_local


def synthetic(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten separable 'digits': class c lights up a distinct 4x4 patch."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = 0.1 * torch.randn(n, 1, 28, 28, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c, 5)
        x[i, 0, 4 + 10 * r : 8 + 10 * r, 2 + 5 * col : 6 + 5 * col] += 2.0
    return x, y


def test_training_lowers_loss_on_a_tiny_set():
    # Prepare
    x, y = synthetic()
    model = build_model("cnn", generator=torch.Generator().manual_seed(0))
    before, _ = evaluate(model, x, y)
    # Execute
    train_local(
        model,
        x,
        y,
        config=TrainConfig(epochs=3, batch_size=10, lr=0.05, momentum=0.5),
        generator=torch.Generator().manual_seed(1),
    )
    # Assert
    after, acc = evaluate(model, x, y)
    assert after < 0.5 * before
    assert acc > 0.9


def test_training_is_deterministic_for_a_seed():
    x, y = synthetic(60)
    results = []
    for _ in range(2):
        model = build_model("cnn", generator=torch.Generator().manual_seed(0))
        train_local(model, x, y, config=TrainConfig(), generator=torch.Generator().manual_seed(9))
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_training_does_not_read_global_rng():
    x, y = synthetic(30)
    model = build_model("cnn", generator=torch.Generator().manual_seed(0))
    state = torch.get_rng_state()
    train_local(model, x, y, config=TrainConfig(), generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)


def test_train_stats_count_steps():
    x, y = synthetic(35)
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    stats = train_local(
        model,
        x,
        y,
        config=TrainConfig(epochs=2, batch_size=10),
        generator=torch.Generator().manual_seed(0),
    )
    assert (stats.steps, stats.samples) == (8, 70)
