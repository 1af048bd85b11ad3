"""Models used in the experiments (sizes for MNIST's 1x28x28 inputs and 10 classes).

- ``cnn``: the LL-BCFL paper's CNN (the PyTorch MNIST example): conv 1->10 k5,
  conv 10->20 k5 with channel dropout, fc 320->50 with dropout, fc 50->10;
  21,840 parameters.
- ``cnn-large``: McMahan et al. 2017's CNN: two 5x5 "same" convolutions with
  32 and 64 channels, each followed by 2x2 max pooling, fc 3136->512, fc
  512->10; 1,663,370 parameters.
- ``mlp``: McMahan et al.'s 2NN, 784->200->200->10; 199,210 parameters.

Each is registered in ``MODEL_REGISTRY`` under its ``--model`` name and is
built for an input shape ``(C, H, W)`` and a class count (the first and last
layers follow them); :func:`model_for` builds the configured model for the
configured dataset.

Dropout draws its masks from an explicit generator (never the global RNG), so
``forward`` takes the masks as an argument: ``sample_masks`` makes them for a
batch, and the per-sample-gradient code can slice them per example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fl.datasets import dataset_of
from fl.registry import Registry

Masks = Sequence[torch.Tensor]
# MNIST's: the shape models are built for unless told otherwise.
DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (1, 28, 28)
DEFAULT_NUM_CLASSES = 10


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


MODEL_REGISTRY: Registry[type[FLModel]] = Registry("model")


def _after_valid_conv_pool(size: int, *, kernel: int = 5) -> int:
    """A side after a ``kernel`` convolution without padding and a 2x2 max pooling."""
    return (size - kernel + 1) // 2


@MODEL_REGISTRY.register("cnn")
class PaperCNN(FLModel):
    dropout_p = 0.5
    mask_shapes = ((20, 1, 1), (50,))

    def __init__(
        self,
        input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
        num_classes: int = DEFAULT_NUM_CLASSES,
    ) -> None:
        super().__init__()
        channels, height, width = _image_shape(input_shape, "cnn")
        side_h = _after_valid_conv_pool(_after_valid_conv_pool(height))
        side_w = _after_valid_conv_pool(_after_valid_conv_pool(width))
        if side_h < 1 or side_w < 1:
            raise ValueError(f"the cnn needs images of at least 16x16, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc1 = nn.Linear(20 * side_h * side_w, 50)
        self.fc2 = nn.Linear(50, num_classes)

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


@MODEL_REGISTRY.register("cnn-large")
class McMahanCNN(FLModel):
    def __init__(
        self,
        input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
        num_classes: int = DEFAULT_NUM_CLASSES,
    ) -> None:
        super().__init__()
        channels, height, width = _image_shape(input_shape, "cnn-large")
        if height < 4 or width < 4:
            raise ValueError(f"the cnn-large needs images of at least 4x4, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear((height // 4) * (width // 4) * 64, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2).flatten(start_dim=-3)
        return self.fc2(F.relu(self.fc1(x)))


@MODEL_REGISTRY.register("mlp")
class MLP(FLModel):
    def __init__(
        self,
        input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
        num_classes: int = DEFAULT_NUM_CLASSES,
    ) -> None:
        super().__init__()
        self.input_dims = len(input_shape)
        self.fc1 = nn.Linear(math.prod(input_shape), 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor, masks: Masks | None = None) -> torch.Tensor:
        x = x.flatten(start_dim=-self.input_dims)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


MODEL_NAMES: tuple[str, ...] = MODEL_REGISTRY.names()


def _image_shape(input_shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"the {name} needs (channels, height, width) inputs, got {input_shape}")
    channels, height, width = (int(v) for v in input_shape)
    return channels, height, width


def init_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default Conv/Linear initialisation, drawn from ``generator``."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(module.weight)
                bound = 1.0 / math.sqrt(fan_in)
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def build_model(
    name: str,
    *,
    generator: torch.Generator,
    input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    num_classes: int = DEFAULT_NUM_CLASSES,
) -> FLModel:
    """A freshly initialised model by registered name, for inputs of
    ``input_shape`` (one example, channels first) and ``num_classes`` classes."""
    model_class = MODEL_REGISTRY.get(name)
    # Build on the meta device so the layers' own initialisation (which draws
    # from the global RNG) never runs; then draw real values from ``generator``.
    with torch.device("meta"):
        model = model_class(input_shape=input_shape, num_classes=num_classes)
    model.to_empty(device="cpu")
    init_parameters(model, generator)
    return model


def model_for(config: Any, *, generator: torch.Generator) -> FLModel:
    """``config.model`` built for the inputs and classes of ``config.dataset``."""
    data = dataset_of(config)
    return build_model(
        config.model,
        generator=generator,
        input_shape=data.input_shape,
        num_classes=data.num_classes,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
