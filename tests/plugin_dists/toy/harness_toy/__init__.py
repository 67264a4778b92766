"""A tiny third-party plugin: one backbone, one mixer, one metric that can be made to fail."""
import time

import torch
from torch import nn

import harness


class Toy(nn.Module):
    def __init__(self, input_size, in_channels, num_classes, width, fail, oom, sleep):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.out = nn.Conv2d(width, in_channels, 3, padding=1)
        self.emb = nn.Embedding(max(num_classes, 1), width)
        self.fail, self.oom, self.sleep = fail, oom, sleep

    def forward(self, x, t, y=None):
        if self.sleep:
            time.sleep(self.sleep)
        if self.fail:
            raise RuntimeError("toy failure requested")
        if self.oom:
            raise torch.OutOfMemoryError("toy out of memory")
        h = self.conv(x)
        if y is not None:
            h = h + self.emb(y)[:, :, None, None]
        return self.out(torch.relu(h))


def toy(*, input_size: int = 8, in_channels: int = 3, num_classes: int = 10, context_dim: int = 0,
        width: int = 8, fail: bool = False, oom: bool = False, sleep: float = 0.0):
    """A two-conv backbone for tests."""
    return Toy(input_size, in_channels, num_classes, width, fail, oom, sleep)


class Shift(nn.Module):
    def forward(self, x, hw):
        return torch.roll(x, 1, dims=1)


def shift(dim: int):
    """Moves every token one place along (no parameters)."""
    return Shift()


class Constant:
    name, direction, unit = "toy_constant", "higher", ""

    def __init__(self, value: float = 1.0, unavailable: bool = False):
        self.value, self.unavailable = value, unavailable

    def __call__(self, ctx):
        if self.unavailable:
            raise harness.MetricUnavailable("toy metric needs weights that are not here")
        return {"value": self.value, "note": "constant"}


@harness.hookimpl
def harness_backbones():
    return {"toy": toy}


@harness.hookimpl
def harness_mixers():
    return {"toy-shift": shift}


@harness.hookimpl
def harness_metrics():
    return {"toy_constant": Constant}
