"""A small, interpretable CNN: 1 to 4 conv stages and a linear read-out (optionally one hidden layer).

Axis names used in shape comments: B batch, C channels, H/W height/width, K classes, D features.

The default is the MNIST network of the quick start (``CNNConfig()``, 18,378 parameters)::

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

Other shapes come from :class:`CNNConfig`: ``channels`` (one entry per stage), ``kernel_size``,
``padding``, ``batchnorm`` (BatchNorm2d between each conv and its activation; ``hook_pre`` is
after it), ``activation`` (``relu``, ``gelu`` or ``solu``), ``pool`` (1: none) and ``hidden``
(a hidden linear layer of that width, its activation and ``hook_hidden`` before ``fc``). Every
stage is a :class:`ConvBlock` named ``conv{i}`` with the same three hook points.

SoLU (Elhage et al. 2022, "Softmax Linear Units"): x · softmax(x), the softmax over channels at
each position, followed by a LayerNorm over channels, as the paper uses it; the pair is one
module (:class:`SoLU`), and ``hook_post`` reads its output.

Every nonlinearity is its own module and none is in place, so gradient-based attribution
(Captum included) sees each one separately. The model takes raw pixel intensities in [0, 1]:
an all-zero baseline is a black image, and feature visualisation works in pixel space.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import HookPoint

ACTIVATIONS = ("relu", "gelu", "solu")
MAX_WIDTH = 4096  # a stage's channels, as a run's config may hold them (cnn.runs.MAX_SIZE)
MAX_HIDDEN = 1 << 20  # the hidden layer's width, likewise


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = (16, 32)
    kernel_size: int = 5
    padding: int = 0
    pool: int = 2
    batchnorm: bool = False
    activation: str = "relu"
    hidden: int | None = None
    n_classes: int = 10
    mean: float | tuple[float, ...] = 0.1307  # training-set pixel mean and std, used inside the model
    std: float | tuple[float, ...] = 0.3081  # (MNIST's by default; one per channel for RGB data)

    def stage_sizes(self) -> list[tuple[int, int]]:
        """(conv output size, stage output size) per stage; raises when the image is too small."""
        size, out = self.image_size, []
        for i in range(len(self.channels)):
            conv = size + 2 * self.padding - self.kernel_size + 1
            pooled = conv // self.pool if conv >= 1 else 0
            if conv < 1 or pooled < 1:
                raise MechscopeError(
                    f"image size {self.image_size} is too small for this network: stage conv{i + 1} gets "
                    f"{size}x{size} maps and a {self.kernel_size}x{self.kernel_size} convolution (padding "
                    f"{self.padding}) with {self.pool}x{self.pool} pooling leaves nothing"
                )
            out.append((conv, pooled))
            size = pooled
        return out

    @property
    def final_size(self) -> int:
        return self.stage_sizes()[-1][1]

    def validate(self) -> None:
        self.validate_shape()
        if self.n_classes < 2:
            raise MechscopeError(f"a classifier needs at least two classes, got {self.n_classes}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != self.in_channels:
                raise MechscopeError(f"{name} has {len(v)} values for {self.in_channels} input channels")
            for x in v if isinstance(v, tuple) else (v,):  # pixels are in [0, 1]: past 1,000, NaN logits
                ok = isinstance(x, (int, float)) and not isinstance(x, bool) and -1e3 <= x <= 1e3
                if not ok or (name == "std" and x <= 0):
                    want = "above 0 and at most 1,000" if name == "std" else "from -1,000 to 1,000"
                    raise MechscopeError(f"{name} {x!r}: expected a finite number {want} (the {name} of pixels "
                                         "scaled to [0, 1])")  # fmt: skip
        self.stage_sizes()

    def validate_shape(self) -> None:
        """The network's own options (not those that come from the data)."""
        if not 1 <= len(self.channels) <= 4 or any(not 1 <= c <= MAX_WIDTH for c in self.channels):
            raise MechscopeError(f"channels must be 1 to 4 widths of 1 to {MAX_WIDTH:,}, got {list(self.channels)}")
        if self.kernel_size < 1 or self.padding < 0 or self.pool < 1:
            raise MechscopeError(
                f"kernel size and pool must be at least 1 and padding at least 0, got kernel "
                f"{self.kernel_size}, padding {self.padding}, pool {self.pool}"
            )
        if self.activation not in ACTIVATIONS:
            raise MechscopeError(f"unknown activation {self.activation!r}; expected one of {', '.join(ACTIVATIONS)}")
        if self.hidden is not None and not 1 <= self.hidden <= MAX_HIDDEN:
            raise MechscopeError(f"hidden width must be 1 to {MAX_HIDDEN:,}, got {self.hidden}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CNNConfig:
        """From config.json; runs written before the shape options had conv1_channels/conv2_channels."""
        d = dict(d)
        if "conv1_channels" in d or "conv2_channels" in d:
            d["channels"] = (d.pop("conv1_channels", 16), d.pop("conv2_channels", 32))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise MechscopeError(f"unknown model fields {', '.join(unknown)}")
        d["channels"] = tuple(d.get("channels", cls.channels))
        for name in ("mean", "std"):
            if isinstance(d.get(name), list):
                d[name] = tuple(d[name])
        return cls(**d)


class Normalize(nn.Module):
    """(x - mean) / std with a scalar or one value per channel."""

    def __init__(self, mean: float | tuple[float, ...], std: float | tuple[float, ...]) -> None:
        super().__init__()
        shape = (-1, 1, 1) if isinstance(mean, tuple) else ()
        self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ChannelNorm(nn.Module):
    """LayerNorm over the channels at each position of [B, C, H, W] (or over D of [B, D])."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(1, keepdim=True)
        var = x.var(1, keepdim=True, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - mu) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class SoLU(nn.Module):
    """SoLU(x) = x · softmax(x) over channels (dim 1), then a LayerNorm over channels (Elhage et al. 2022)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x * torch.softmax(x, dim=1))


def make_activation(name: str, channels: int) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "solu":
        return SoLU(channels)
    raise MechscopeError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d(k)`` (stride k, no padding): the same values, taken as the maximum of k² strided views when no
    gradient is needed (torch's CPU kernel is 3-7× slower on these small maps; a maximum is exact in any order and
    passes NaN on as the kernel does). With a gradient it is torch's own, so training and attributions are
    unchanged (the two route a tie's gradient differently)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.kernel_size
        plain = isinstance(k, int) and self.stride == k and self.padding == 0 and self.dilation == 1
        if not plain or self.ceil_mode or self.return_indices or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        h, w = x.shape[-2] // k * k, x.shape[-1] // k * k
        out = x[..., 0:h:k, 0:w:k]
        for i, j in ((i, j) for i in range(k) for j in range(k) if i or j):
            out = torch.maximum(out, x[..., i:h:k, j:w:k])
        return out


class ConvBlock(nn.Module):
    """Conv -> [BatchNorm] -> activation -> [MaxPool], with a hook point after each step."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        pool: int,
        padding: int = 0,
        batchnorm: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, padding=padding)
        if batchnorm:
            self.norm = nn.BatchNorm2d(c_out)
        self.hook_pre = HookPoint()
        self.act = make_activation(activation, c_out)
        self.hook_post = HookPoint()
        if pool > 1:
            self.pool = MaxPool2d(pool)
        self.hook_out = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # [B, C_out, H', W']
        if hasattr(self, "norm"):
            x = self.norm(x)
        x = self.hook_pre(x)
        x = self.hook_post(self.act(x))
        if hasattr(self, "pool"):
            x = self.pool(x)  # [B, C_out, H'/pool, W'/pool]
        return self.hook_out(x)


class CNN(nn.Module):
    """Conv stages ``conv1``..``convN`` and a read-out; about 18k parameters with the defaults."""

    def __init__(self, config: CNNConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CNNConfig()
        config.validate()
        self.hook_input = HookPoint()
        self.normalize = Normalize(config.mean, config.std)
        c_in = config.in_channels
        for i, c_out in enumerate(config.channels, 1):
            block = ConvBlock(
                c_in, c_out, config.kernel_size, config.pool, config.padding, config.batchnorm, config.activation
            )
            self.add_module(f"conv{i}", block)
            c_in = c_out
        self.flatten = nn.Flatten()
        d = config.channels[-1] * config.final_size**2
        if config.hidden is not None:
            self.hidden = nn.Linear(d, config.hidden)
            self.hidden_act = make_activation(config.activation, config.hidden)
            self.hook_hidden = HookPoint()
            d = config.hidden
        self.fc = nn.Linear(d, config.n_classes)
        self.hook_logits = HookPoint()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def stages(self) -> list[ConvBlock]:
        return [getattr(self, f"conv{i}") for i in range(1, len(self.config.channels) + 1)]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear error for an input the model cannot take."""
        check_image_input(x, self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape[1:] != self.input_shape:
            check_image_input(x, self.input_shape)  # uint8 pixels ran as if in [0, 1]; a wrong shape was conv2d's
        if x.dtype != self.fc.weight.dtype and not torch.is_autocast_enabled(x.device.type):  # float64 pixels were
            # "mat1 and mat2 must have the same dtype" (under autocast bfloat16 pixels are the point)
            raise MechscopeError(f"expected {self.fc.weight.dtype} pixels (the model's dtype), got {x.dtype}")
        x = self.hook_input(x)  # [B, C, H, W], pixels in [0, 1]
        x = self.normalize(x)
        for block in self.stages:
            x = block(x)  # [B, C_i, H_i, W_i]
        x = self.flatten(x)  # [B, D]
        if self.config.hidden is not None:
            x = self.hook_hidden(self.hidden_act(self.hidden(x)))  # [B, hidden]
        return self.hook_logits(self.fc(x))  # [B, K]

    def layer_names(self) -> list[str]:
        return [f"conv{i}" for i in range(1, len(self.config.channels) + 1)] + (
            ["hidden", "fc"] if self.config.hidden is not None else ["fc"]
        )




def check_image_input(x: torch.Tensor, input_shape: tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise MechscopeError(f"expected a tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise MechscopeError(f"expected a floating-point input in [0, 1], got dtype {x.dtype}")
    if x.dim() != 4 or tuple(x.shape[1:]) != tuple(input_shape):
        raise MechscopeError(f"expected input shaped [batch, {', '.join(map(str, input_shape))}], got {list(x.shape)}")
    if torch.isnan(x).any():
        raise MechscopeError("input contains NaN")


