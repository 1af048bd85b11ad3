import pytest
import torch

from fl.models import build_model, count_parameters


@pytest.mark.parametrize(
    ("name", "expected"), [("cnn", 21_840), ("cnn-large", 1_663_370), ("mlp", 199_210)]
)
def test_parameter_counts(name, expected):
    model = build_model(name, generator=torch.Generator().manual_seed(0))
    assert count_parameters(model) == expected


@pytest.mark.parametrize("name", ["cnn", "cnn-large", "mlp"])
def test_forward_gives_ten_logits_per_image(name):
    model = build_model(name, generator=torch.Generator().manual_seed(0))
    out = model(torch.zeros(4, 1, 28, 28))
    assert out.shape == (4, 10)


def test_initialisation_is_deterministic_for_a_generator_seed():
    a = build_model("cnn", generator=torch.Generator().manual_seed(5))
    b = build_model("cnn", generator=torch.Generator().manual_seed(5))
    c = build_model("cnn", generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


def test_initialisation_does_not_touch_global_rng():
    state = torch.get_rng_state()
    build_model("cnn", generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_dropout_masks_scale_kept_units_and_follow_generator():
    model = build_model("cnn", generator=torch.Generator().manual_seed(0))
    m1 = model.sample_masks(8, torch.Generator().manual_seed(3))
    m2 = model.sample_masks(8, torch.Generator().manual_seed(3))
    assert [m.shape for m in m1] == [(8, 20, 1, 1), (8, 50)]
    assert set(torch.unique(m1[1]).tolist()) <= {0.0, 2.0}
    assert all(torch.equal(a, b) for a, b in zip(m1, m2, strict=True))


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", generator=torch.Generator())
