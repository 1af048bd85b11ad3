import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from fl import validation
from fl.models import build_model
from fl.validation import (
    ValidationParams,
    direction_outliers,
    judge_accuracies,
    reference_direction,
    reference_outliers,
    structural_problem,
    update_norm,
    validate_updates,
)
from fl.weights import get_weights, set_weights
from tests.fl.synthetic import synthetic_split

REF = OrderedDict(w=torch.zeros(2, 3), b=torch.zeros(3))


def test_structurally_sound_update_passes():
    assert structural_problem(OrderedDict(w=torch.ones(2, 3), b=torch.ones(3)), REF) is None


@pytest.mark.parametrize(
    ("delta", "reason"),
    [
        (OrderedDict(w=torch.ones(2, 3)), "missing ['b']"),
        (OrderedDict(w=torch.ones(2, 3), b=torch.ones(3), x=torch.ones(1)), "unexpected ['x']"),
        (OrderedDict(w=torch.ones(3, 2), b=torch.ones(3)), "w: shape (3, 2) != model shape (2, 3)"),
        (OrderedDict(w=torch.ones(2, 3, dtype=torch.float64), b=torch.ones(3)), "w: dtype"),
        (
            OrderedDict(w=torch.ones(2, 3), b=torch.tensor([1.0, float("nan"), 0.0])),
            "b: contains NaN",
        ),
        (OrderedDict(w=torch.ones(2, 3), b=torch.tensor([1.0, float("inf"), 0.0])), "infinite"),
    ],
)
def test_structural_problems_are_named(delta, reason):
    assert reason in structural_problem(delta, REF)


def test_update_norm():
    assert update_norm(OrderedDict(a=torch.tensor([3.0]), b=torch.tensor([4.0]))) == 5.0


def test_relative_rule_rejects_the_outlier_only():
    # Prepare: median 0.90, MAD 0.01 -> floor 0.02 applies -> cut 0.90 - 3*0.02 = 0.84
    acc = {"a": 0.90, "b": 0.91, "c": 0.89, "d": 0.88, "e": 0.10}
    # Execute
    verdicts = judge_accuracies(acc, ValidationParams())
    # Assert
    assert [c for c, v in verdicts.items() if not v.accepted] == ["e"]
    assert "0.1000 < round median 0.8900 - 3*MAD = 0.8300" in verdicts["e"].reason


def test_relative_rule_keeps_a_noisy_but_consistent_round():
    acc = {"a": 0.62, "b": 0.55, "c": 0.58, "d": 0.60, "e": 0.51}
    assert all(v.accepted for v in judge_accuracies(acc, ValidationParams()).values())


def test_absolute_rule_is_the_papers_threshold():
    acc = {"a": 0.62, "b": 0.40}
    verdicts = judge_accuracies(acc, ValidationParams(rule="absolute", min_accuracy=0.5))
    assert (verdicts["a"].accepted, verdicts["b"].accepted) == (True, False)
    assert verdicts["b"].reason == "validation accuracy 0.4000 < threshold 0.5000"


def test_validate_updates_rejects_boosted_and_nan_before_scoring():
    # Prepare
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    gw = get_weights(model)
    g = torch.Generator().manual_seed(1)
    honest = [
        (f"h{i}", OrderedDict((k, 0.01 * torch.randn(v.shape, generator=g)) for k, v in gw.items()))
        for i in range(4)
    ]
    boosted = ("boost", OrderedDict((k, 10 * v) for k, v in honest[0][1].items()))
    nan = ("nan", OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in gw.items()))
    val = synthetic_split(100, seed=0)
    # Execute
    verdicts = validate_updates(
        model=model,
        global_weights=gw,
        updates=[*honest, boosted, nan],
        x_val=val.x,
        y_val=val.y,
        params=ValidationParams(),
    )
    # Assert
    assert verdicts["nan"].reason.startswith("malformed: ")
    assert "x round median" in verdicts["boost"].reason
    assert all(verdicts[f"h{i}"].accuracy is not None for i in range(4))


def _mlp() -> tuple:
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    return model, get_weights(model)


def _unit(d: OrderedDict) -> OrderedDict:
    norm = update_norm(d)
    return OrderedDict((k, v / norm) for k, v in d.items())


def _judge_on_off_absolute(model, gw, updates, **test_on) -> tuple[dict, dict, dict]:
    """Verdicts with the test on, off (the default), and on under the absolute rule."""
    val = synthetic_split(50, seed=0)

    def judge(params: ValidationParams) -> dict:
        return validate_updates(
            model=model, global_weights=gw, updates=updates, x_val=val.x, y_val=val.y, params=params
        )

    return (
        judge(ValidationParams(**test_on)),
        judge(ValidationParams()),
        judge(ValidationParams(rule="absolute", **test_on)),
    )


def test_relative_rule_rejects_a_norm_outside_the_rounds_spread():
    # Prepare: DP-like updates, a common noise length 1.0 each; one also carries
    # a coherent 0.3x-longer push (as label flipping does), under 3x the median.
    model, gw = _mlp()
    g = torch.Generator().manual_seed(2)

    def unit_noise() -> OrderedDict:
        return _unit(OrderedDict((k, torch.randn(v.shape, generator=g)) for k, v in gw.items()))

    updates = [(f"h{i}", unit_noise()) for i in range(6)]
    updates.append(("flip", OrderedDict((k, 1.3 * v) for k, v in unit_noise().items())))

    # Execute
    spread, default, absolute = _judge_on_off_absolute(model, gw, updates, norm_spread=True)
    # Assert: median 1.0, MAD ~0 -> floor 0.03 -> cut 1.0 + 3 * 0.03 = 1.09
    assert spread["flip"].reason == "update norm 1.300 > round median 1.000 + 3*MAD = 1.090"
    assert all(spread[f"h{i}"].accuracy is not None for i in range(6))
    # Off by default, and the paper's absolute rule has no spread test.
    assert default["flip"].accuracy is not None
    assert absolute["flip"].accuracy is not None


def test_relative_rule_rejects_an_update_pointing_away_from_its_round():
    # Prepare: unit-length updates (so no norm test fires); honest ones share a
    # common direction under their own noise, the "flip" one does not.
    model, gw = _mlp()
    g = torch.Generator().manual_seed(3)
    common = _unit(OrderedDict((k, torch.randn(v.shape, generator=g)) for k, v in gw.items()))

    def unit(share: float) -> OrderedDict:
        return _unit(
            OrderedDict(
                (k, share * common[k] + torch.randn(v.shape, generator=g) * 0.01)
                for k, v in gw.items()
            )
        )

    updates = [(f"h{i}", unit(1.0)) for i in range(6)]
    updates.append(("flip", unit(0.0)))

    # Execute
    spread, default, absolute = _judge_on_off_absolute(model, gw, updates, cosine_spread=True)
    # Assert: the flip is rejected for its direction and carries its norm;
    # every honest update goes on to the accuracy test.
    assert spread["flip"].reason.startswith("direction: cosine with the round's other updates")
    assert not spread["flip"].accepted and spread["flip"].norm == pytest.approx(1.0)
    assert all(spread[f"h{i}"].accuracy is not None for i in range(6))
    # Off by default, and the paper's absolute rule has no direction test.
    assert default["flip"].accuracy is not None
    assert absolute["flip"].accuracy is not None


def test_direction_outliers_needs_three_updates_and_is_order_free():
    g = torch.Generator().manual_seed(4)
    c = torch.randn(50, generator=g)
    honest = {f"h{i}": {"w": c + 0.01 * torch.randn(50, generator=g)} for i in range(3)}
    away = {"w": -c}
    assert direction_outliers(dict(list(honest.items())[:2]), mad_k=3.0, floor=0.02) == {}
    forward = direction_outliers({**honest, "away": away}, mad_k=3.0, floor=0.02)
    backward = direction_outliers(
        {"away": away, **dict(reversed(honest.items()))}, mad_k=3.0, floor=0.02
    )
    assert forward == backward
    assert (
        list(forward) == ["away"] and "cosine with the round's other updates -" in forward["away"]
    )
    # Tensor order inside an update does not matter either.
    split = {k: {"a": v["w"][:20], "b": v["w"][20:]} for k, v in {**honest, "away": away}.items()}
    split["h0"] = {"b": split["h0"]["b"], "a": split["h0"]["a"]}
    assert direction_outliers(split, mad_k=3.0, floor=0.02) == forward


def test_absolute_norm_bound():
    model = build_model("mlp", generator=torch.Generator().manual_seed(0))
    gw = get_weights(model)
    big = OrderedDict((k, torch.ones_like(v)) for k, v in gw.items())
    val = synthetic_split(20, seed=0)
    verdicts = validate_updates(
        model=model,
        global_weights=gw,
        updates=[("c", big)],
        x_val=val.x,
        y_val=val.y,
        params=ValidationParams(norm_bound=1.0),
    )
    assert "exceeds bound 1" in verdicts["c"].reason


def _hand_reference(model, gw, x, y, clip: float) -> torch.Tensor:
    """Minus the mean of the clipped per-sample gradients, one backward pass per example."""
    set_weights(model, gw)
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        g = torch.cat([p.grad.detach().double().reshape(-1) for p in model.parameters()])
        rows.append(g * min(1.0, clip / float(g.norm())))
    return -torch.stack(rows).mean(dim=0)


def test_reference_direction_is_minus_the_mean_clipped_per_sample_gradient(monkeypatch):
    # Prepare: 7 examples in chunks of 3, a clip that cuts some gradients and not others.
    monkeypatch.setattr(validation, "PER_SAMPLE_CHUNK", 3)
    model, gw = _mlp()
    val = synthetic_split(7, seed=5)
    unclipped = _hand_reference(model, gw, val.x, val.y, clip=float("inf"))
    norms = [
        float(_hand_reference(model, gw, val.x[i : i + 1], val.y[i : i + 1], float("inf")).norm())
        for i in range(7)
    ]
    clip = sorted(norms)[3]
    # Execute
    ref = reference_direction(model, gw, val.x, val.y, clip=clip)
    # Assert
    assert list(ref) == list(gw)
    flat = torch.cat([t.reshape(-1) for t in ref.values()])
    assert flat.dtype == torch.float64
    torch.testing.assert_close(
        flat, _hand_reference(model, gw, val.x, val.y, clip), rtol=1e-5, atol=1e-7
    )
    assert not torch.allclose(flat, unclipped, rtol=1e-3)


def _at_cosines(cosines: dict[str, float], dim: int) -> tuple[dict, dict]:
    """A reference along the first axis and one update per id at exactly its cosine to it."""
    reference = {"w": torch.zeros(dim, dtype=torch.float64)}
    reference["w"][0] = 2.0
    deltas = {}
    for axis, (cid, c) in enumerate(cosines.items(), 1):
        w = torch.zeros(dim, dtype=torch.float64)
        w[0], w[axis] = c, math.sqrt(1 - c * c)
        deltas[cid] = {"w": 3.0 * w}
    return deltas, reference


def test_reference_floor_is_the_noise_spread_at_the_medians_angle():
    # Prepare: honest cosines bunched at 0.84 (MAD 0.001), as in a round where the
    # global model swings; a label-flipped update at 0.80.
    honest = {f"h{i}": 0.84 + 0.001 * i for i in range(6)}
    deltas, reference = _at_cosines({**honest, "flip": 0.80}, dim=20_000)
    med = 0.842  # the median of the seven cosines
    floor = 3.0 * math.sqrt((1 - med * med) / 20_000)
    # Execute
    tight = reference_outliers(deltas, reference, mad_k=3.0, floor_sds=3.0)
    loose = reference_outliers(deltas, reference, mad_k=3.0, floor_sds=6.0)
    # Assert: cut = 0.842 - 3 * 0.0114 = 0.808 rejects the flip; a floor twice as wide
    # (cut 0.773) would not.
    assert tight == {
        "flip": "direction: cosine with the validation set's clipped descent 0.800 < round "
        f"median 0.842 - 3*MAD = {med - 3 * floor:.3f}"
    }
    assert f"{med - 3 * floor:.3f}" == "0.808"
    assert loose == {}
    # Fewer than three updates: no test.
    assert reference_outliers(dict(list(deltas.items())[:2]), reference, mad_k=3, floor_sds=3) == {}


def test_relative_rule_rejects_colluders_against_the_validation_descent():
    # Prepare: 6 honest updates along the validation set's clipped descent under
    # their own noise; 4 colluders share another direction that still has a
    # positive part along it (a label flip on a swinging model does).
    model, gw = _mlp()
    val = synthetic_split(50, seed=0)
    ref = reference_direction(model, gw, val.x, val.y, clip=1.0)
    g = torch.Generator().manual_seed(6)
    along = _unit(OrderedDict((k, v.float()) for k, v in ref.items()))
    other = _unit(OrderedDict((k, torch.randn(v.shape, generator=g)) for k, v in gw.items()))

    def update(a: float, b: float) -> OrderedDict:
        return _unit(
            OrderedDict(
                (k, a * along[k] + b * other[k] + 0.02 * torch.randn(v.shape, generator=g))
                for k, v in gw.items()
            )
        )

    updates = [(f"h{i}", update(1.0, 0.0)) for i in range(6)]
    updates += [(f"m{i}", update(0.6, 0.8)) for i in range(4)]
    # Execute
    on, default, absolute = _judge_on_off_absolute(model, gw, updates, reference_cosine=True)
    round_only, _, _ = _judge_on_off_absolute(model, gw, updates, cosine_spread=True)
    backward, _, _ = _judge_on_off_absolute(model, gw, updates[::-1], reference_cosine=True)
    # Assert: every colluder is rejected for its direction, every honest update
    # goes on to the accuracy test, and arrival order changes nothing.
    assert sorted(c for c, v in on.items() if v.reason.startswith("direction: ")) == [
        f"m{i}" for i in range(4)
    ]
    assert all("validation set's clipped descent" in on[f"m{i}"].reason for i in range(4))
    assert all(on[f"h{i}"].accuracy is not None for i in range(6))
    assert backward == on
    # The round's own sum, which the colluders pull their way, lets them through.
    assert all(round_only[f"m{i}"].accuracy is not None for i in range(4))
    # Off by default, and the paper's absolute rule has no direction test.
    assert all(default[f"m{i}"].accuracy is not None for i in range(4))
    assert all(absolute[f"m{i}"].accuracy is not None for i in range(4))
