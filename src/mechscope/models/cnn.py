"""A small, interpretable CNN for MNIST.

Axis names used in shape comments: B batch, C channels, H/W height/width, K classes.

::

    input [B, 1, 28, 28] pixels in [0, 1]       hook_input
      normalize  (x - mean) / std                inside the model, so pixels stay pixels
    conv1: Conv2d(1->16, 5x5)  -> [B, 16, 24, 24]   conv1.hook_pre
           ReLU                                     conv1.hook_post
           MaxPool2d(2)        -> [B, 16, 12, 12]   conv1.hook_out
    conv2: Conv2d(16->32, 5x5) -> [B, 32, 8, 8]     conv2.hook_pre
           ReLU                                     conv2.hook_post
           MaxPool2d(2)        -> [B, 32, 4, 4]     conv2.hook_out
    flatten                    -> [B, 512]          the read-out's input units (c, y, x order)
    fc: Linear(512->10)        -> [B, 10]           hook_logits

Every nonlinearity is its own module and none is in place, so gradient-based attribution
(Captum included) sees each one separately. The model takes raw pixel intensities in [0, 1]:
an all-zero baseline is a black image, and feature visualisation works in pixel space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mechscope.errors import MechscopeError
from mechscope.hooks import HookPoint


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28
    conv1_channels: int = 16
    conv2_channels: int = 32
    kernel_size: int = 5
    pool: int = 2
    n_classes: int = 10
    mean: float = 0.1307  # MNIST training-set pixel mean and std, used inside the model
    std: float = 0.3081

    @property
    def conv1_size(self) -> int:
        return self.image_size - self.kernel_size + 1

    @property
    def conv2_size(self) -> int:
        return self.conv1_size // self.pool - self.kernel_size + 1

    @property
    def final_size(self) -> int:
        return self.conv2_size // self.pool

    def validate(self) -> None:
        if self.final_size < 1:
            raise MechscopeError(
                f"image size {self.image_size} is too small for two {self.kernel_size}x"
                f"{self.kernel_size} convolutions with {self.pool}x{self.pool} pooling"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class Normalize(nn.Module):
    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBlock(nn.Module):
    """Conv -> ReLU -> MaxPool, with a hook point after each."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, pool: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size)
        self.hook_pre = HookPoint()
        self.relu = nn.ReLU()
        self.hook_post = HookPoint()
        self.pool = nn.MaxPool2d(pool)
        self.hook_out = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_pre(self.conv(x))  # [B, C_out, H', W']
        x = self.hook_post(self.relu(x))
        return self.hook_out(self.pool(x))  # [B, C_out, H'/pool, W'/pool]


class MnistCNN(nn.Module):
    """Two conv blocks and a linear read-out (about 18k parameters with the defaults)."""

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CNNConfig()
        config.validate()
        self.hook_input = HookPoint()
        self.normalize = Normalize(config.mean, config.std)
        self.conv1 = ConvBlock(config.in_channels, config.conv1_channels, config.kernel_size, config.pool)
        self.conv2 = ConvBlock(config.conv1_channels, config.conv2_channels, config.kernel_size, config.pool)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(config.conv2_channels * config.final_size**2, config.n_classes)
        self.hook_logits = HookPoint()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an input the model cannot take."""
        if not isinstance(x, torch.Tensor):
            raise MechscopeError(f"expected a tensor input, got {type(x).__name__}")
        if not x.is_floating_point():
            raise MechscopeError(f"expected a floating-point input in [0, 1], got dtype {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise MechscopeError(
                f"expected input shaped [batch, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )
        if torch.isnan(x).any():
            raise MechscopeError("input contains NaN")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_input(x)  # [B, 1, 28, 28], pixels in [0, 1]
        x = self.conv1(self.normalize(x))  # [B, 16, 12, 12]
        x = self.conv2(x)  # [B, 32, 4, 4]
        return self.hook_logits(self.fc(self.flatten(x)))  # [B, 10]

    def layer_names(self) -> list[str]:
        return ["conv1", "conv2", "fc"]


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
