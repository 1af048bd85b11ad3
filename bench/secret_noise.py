"""What secret DP noise costs: a DP round with secret noise vs. with seeded noise, one run.

A round of the reference setting (20 clients of 600 records, full-batch
DP-SGD, the benchmark's hyper-parameters) is timed twice per repetition: once
with the noise from the operating system's CSPRNG (``fl.privacy.SecretNoise``,
the default) and once from a seeded generator (``--reproducible-noise``), in
alternating order. Prints JSON with the mean seconds per round of each and
their ratio (target: at most 1.05), and the time to draw one update's noise.

    python bench/secret_noise.py --data-dir data --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from fl.config import RunConfig
from fl.data import load_mnist, resolve_data_root
from fl.models import build_model
from fl.privacy import PrivacyAccountant, SecretNoise, SeededNoise
from fl.rounds import Federation, dp_config
from fl.seeds import torch_generator
from fl.weights import get_weights

SETTINGS = {
    "gaussian": {"lr": 2.0},
    "laplace": {"lr": 10.0, "dp_subspace": 128},
}


def round_seconds(federation: Federation, clients: list[str], config: RunConfig, rnd: int) -> float:
    model = build_model(config.model, generator=torch_generator(config.seed, "init"))
    weights = get_weights(model)
    start = time.perf_counter()
    for cid in clients:
        state = federation.client(cid)
        # A fresh accountant: the bench repeats rounds far past any budget.
        state.accountant = PrivacyAccountant(dp_config(config), state.plan)
        state.participate(model, weights, round=rnd, config=config)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=20, help="participants per round")
    args = parser.parse_args()
    torch.set_num_threads(1)
    splits = load_mnist(resolve_data_root(args.data_dir), val_size=1, test_size=1)
    out: dict[str, object] = {"repeats": args.repeats, "clients_per_round": args.clients}
    for mechanism, extra in SETTINGS.items():
        base = RunConfig(
            clients=100,
            frac=0.2,
            rounds=100,
            dist="noniid",
            batch_size=600,
            momentum=0.0,
            dropout=False,
            server_momentum=0.9,
            dp=mechanism,
            epsilon=10.0,
            **extra,
        )
        configs = {"secret": base, "seeded": dataclasses.replace(base, reproducible_noise=True)}
        federation = Federation.create(base, splits.train)
        clients = federation.ids[: args.clients]
        times: dict[str, list[float]] = {"secret": [], "seeded": []}
        round_seconds(federation, clients[:2], base, 0)  # warm-up
        for rep in range(args.repeats):
            order = ("secret", "seeded") if rep % 2 == 0 else ("seeded", "secret")
            for mode in order:
                times[mode].append(round_seconds(federation, clients, configs[mode], rep + 1))
        width = federation.client(clients[0]).plan.step
        shape = (
            base.dp_subspace
            if base.dp_subspace
            else sum(
                p.numel() for p in build_model(base.model, generator=torch.Generator()).parameters()
            )
        )
        draw = {}
        for mode, source in (("secret", SecretNoise()), ("seeded", SeededNoise(torch.Generator()))):
            t0 = time.perf_counter()
            for _ in range(100):
                getattr(source, mechanism)((shape,), scale=width.noise_scale)
            draw[mode] = (time.perf_counter() - t0) / 100
        secret, seeded = statistics.mean(times["secret"]), statistics.mean(times["seeded"])
        out[mechanism] = {
            "seconds_per_round_secret": round(secret, 4),
            "seconds_per_round_seeded": round(seeded, 4),
            "ratio_secret_over_seeded": round(secret / seeded, 4),
            "noise_draw_ms": {k: round(1000 * v, 3) for k, v in draw.items()},
            "noise_coordinates": shape,
        }
        print(f"{mechanism}: {out[mechanism]}", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
