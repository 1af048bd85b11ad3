"""Models used in the experiments.

- ``cnn``: the LL-BCFL paper's CNN (the PyTorch MNIST example): conv 1->10 k5,
  conv 10->20 k5 with channel dropout, fc 320->50 with dropout, fc 50->10;
  21,840 parameters.
- ``cnn-large``: McMahan et al. 2017's CNN: two 5x5 "same" convolutions with
  32 and 64 channels, each followed by 2x2 max pooling, fc 3136->512, fc
  512->10; 1,663,370 parameters.
- ``mlp``: McMahan et al.'s 2NN, 784->200->200->10; 199,210 parameters.

Dropout draws its masks from an explicit generator (never the global RNG), so
``forward`` takes the masks as an argument: ``sample_masks`` makes them for a
batch, and the per-sample-gradient code can slice them per example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MODEL_NAMES: tuple[str, ...] = ("cnn", "cnn-large", "mlp")
Masks = Sequence[torch.Tensor]


class FLModel(nn.Module):
    """A classifier whose dropout masks are inputs, not hidden global-RNG draws."""

    dropout_p: float = 0.0
    # Per-example shapes of the dropout masks ``forward`` accepts, in order.
    mask_shapes: tuple[tuple[int, ...], ...] = ()

    def sample_masks(self, batch: int, generator: torch.Generator) -> list[torch.Tensor]:
        keep = 1.0 - self.dropout_p
        return [
            (torch.rand((batch, *shape), generator=generator) < keep).float().div_(keep)
            for shape in self.mask_shapes
        ]

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        raise NotImplementedError


class PaperCNN(FLModel):
    dropout_p = 0.5
    mask_shapes = ((20, 1, 1), (50,))

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = self.conv2(x)
        if masks is not None:
            x = x * masks[0]
        x = F.relu(F.max_pool2d(x, 2)).flatten(start_dim=-3)
        x = F.relu(self.fc1(x))
        if masks is not None:
            x = x * masks[1]
        return self.fc2(x)


class McMahanCNN(FLModel):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(start_dim=-3)
        return self.fc2(F.relu(self.fc1(x)))


class MLP(FLModel):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        x = x.flatten(start_dim=-3)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Conv/Linear initialisation, drawn from ``generator``."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def build_model(name: str, *, generator: torch.Generator) -> FLModel:
    """A freshly initialised model by name (``cnn``, ``cnn-large`` or ``mlp``)."""
    classes: dict[str, type[FLModel]] = {"cnn": PaperCNN, "cnn-large": McMahanCNN, "mlp": MLP}
    if name not in classes:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    # Build on the meta device so the layers' own initialisation (which draws
    # from the global RNG) never runs; then draw real values from ``generator``.
    with torch.device("meta"):
        model = classes[name]()
    model.to_empty(device="cpu")
    init_parameters(model, generator)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
