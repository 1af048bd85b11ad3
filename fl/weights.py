"""Model weights as plain named tensors, and conversions to one flat vector.

``Weights`` is the unit the learning code, the aggregators and (later) the
protobuf serde exchange: an ordered mapping from parameter name to tensor, in
the model's ``state_dict`` order.  Protobuf types never reach ``fl/``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch
from torch import nn

Weights = Mapping[str, torch.Tensor]


def get_weights(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A detached copy of the model's parameters (the models have no buffers)."""
    return OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())


def set_weights(model: nn.Module, weights: Weights) -> None:
    model.load_state_dict(weights, strict=True)


def flatten(weights: Weights) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in weights.values()])


def flat_by_name(weights: Weights) -> torch.Tensor:
    """One float64 vector, tensors in name order (not insertion order): what
    comparisons of updates use, so that they do not depend on the order the
    tensors arrived in."""
    return torch.cat([weights[k].detach().double().reshape(-1) for k in sorted(weights)])


def unflatten(vector: torch.Tensor, like: Weights) -> OrderedDict[str, torch.Tensor]:
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    offset = 0
    for name, ref in like.items():
        n = ref.numel()
        out[name] = vector[offset : offset + n].view_as(ref).clone()
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values, the weights need {offset}")
    return out
