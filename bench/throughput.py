"""Local-training throughput: the simulator's ``ClientState.participate`` vs a bare PyTorch loop.

Both train the same architecture on the same 600-sample shard with the same
batch size and optimiser, interleaved (A, B, A, B, ...) in one process so
machine load affects both alike.  The bare loop is what one would write by
hand: ``nn.Dropout``, a seeded permutation, SGD; no DataLoader.

    python bench/throughput.py --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn

from fl.config import RunConfig
from fl.models import build_model
from fl.privacy import PrivacyAccountant, label_histogram
from fl.rounds import ClientState, dp_config, privacy_plan
from fl.training import TrainConfig
from fl.weights import get_weights


class BareCNN(nn.Module):
    """The PyTorch MNIST example network, exactly as usually written."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2)).flatten(1)
        x = F.dropout(F.relu(self.fc1(x)), training=self.training)
        return self.fc2(x)


def bare_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    for start in range(0, len(y), cfg.batch_size):
        idx = slice(start, start + cfg.batch_size)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    cfg = TrainConfig(epochs=1, batch_size=args.batch_size, lr=0.01, momentum=0.5)
    ours = build_model("cnn", generator=torch.Generator().manual_seed(0))
    global_weights = get_weights(ours)
    run_cfg = RunConfig(batch_size=args.batch_size, lr=0.01, momentum=0.5)
    plan = privacy_plan(run_cfg)
    client = ClientState(
        "client-000",
        x,
        y,
        tuple(int(c) for c in label_histogram(y, num_classes=10).tolist()),
        None,
        PrivacyAccountant(dp_config(run_cfg), plan),
        plan,
    )
    bare = BareCNN()
    bare.load_state_dict(global_weights)
    shuffled = torch.randperm(args.samples, generator=g)
    bx, by = x[shuffled], y[shuffled]

    def run_ours(i: int) -> None:
        client.participate(ours, global_weights, round=i, config=run_cfg)

    def run_bare(i: int) -> None:
        bare.load_state_dict(global_weights)
        order = torch.randperm(args.samples)
        bare_epoch(bare, bx[order], by[order], cfg)

    for fn in (run_ours, run_bare):  # warm-up
        fn(0)
    t_ours, t_bare = [], []
    for i in range(1, args.repeats + 1):
        for fn, acc in ((run_ours, t_ours), (run_bare, t_bare)):
            t0 = time.perf_counter()
            fn(i)
            acc.append(time.perf_counter() - t0)
    ours_sps = args.samples / statistics.median(t_ours)
    bare_sps = args.samples / statistics.median(t_bare)
    print(
        json.dumps(
            {
                "samples": args.samples,
                "batch_size": args.batch_size,
                "threads": args.threads,
                "repeats": args.repeats,
                "simulator_samples_per_s": round(ours_sps, 1),
                "bare_samples_per_s": round(bare_sps, 1),
                "ratio": round(ours_sps / bare_sps, 4),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
