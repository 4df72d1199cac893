"""Image preprocessing as a checkpoint's ``preprocessor_config.json`` says, in torch (no torchvision).

Every image goes the same way: converted to the model's channels (RGB, or grey for a one-channel model), resized
(its shortest edge to ``size["shortest_edge"]`` keeping the aspect, as CLIP's processor; or to ``height`` ×
``width``, as SigLIP's), centre-cropped to ``crop_size``, rescaled to [0, 1] and normalised by ``image_mean`` and
``image_std``. Resizing uses torch's antialiased bicubic or bilinear interpolation, rounded to whole 8-bit levels
as PIL's resize leaves them; it follows PIL closely but not bit for bit (a test measures how closely against
transformers' own processor).

Analyses work on *unit pixels*: images already at the model's size with values in [0, 1] (:meth:`to_unit`);
:meth:`normalize` turns them into what the model takes. Feature visualisation optimises unit pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLE = {
    0: "nearest",
    2: "bilinear",
    3: "bicubic",
    "nearest": "nearest",
    "bilinear": "bilinear",
    "bicubic": "bicubic",
}  # fmt: skip  (PIL's codes: 0 nearest, 2 bilinear, 3 bicubic)


@dataclass(frozen=True)
class Preprocessor:
    image_size: int  # the model's input size (square)
    channels: int = 3
    shortest_edge: int | None = None  # resize the shortest edge to this (CLIP); None: to resize_hw, or no resize
    resize_hw: tuple[int, int] | None = None  # resize to (height, width) (SigLIP)
    resample: str = "bicubic"
    crop_hw: tuple[int, int] | None = None  # centre crop (CLIP)
    rescale: float = 1 / 255
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: dict, image_size: int, channels: int, family: str, where: str = "") -> Preprocessor:
        """From ``preprocessor_config.json``'s fields (an empty dict: the family's defaults at the model's size)."""
        siglip = family == "siglip"

        def size_field(value, key):
            if value is None:
                return None
            if isinstance(value, int) and not isinstance(value, bool):
                return {"height": value, "width": value} if key == "crop_size" or siglip else {"shortest_edge": value}
            if not isinstance(value, dict):
                raise MechscopeError(f"{where}{key}: expected a number or a dict of sizes, got {value!r}")
            return value

        do_resize = cfg.get("do_resize", True)
        size = size_field(cfg.get("size", image_size if not cfg else None), "size") if do_resize else None
        short = hw = None
        if size:
            if "shortest_edge" in size:
                short = _positive(size["shortest_edge"], f"{where}size.shortest_edge")
            elif "height" in size and "width" in size:
                hw = (_positive(size["height"], f"{where}size.height"), _positive(size["width"], f"{where}size.width"))
            else:
                raise MechscopeError(f"{where}size: expected shortest_edge or height and width, got {size!r}")
        crop = None
        if cfg.get("do_center_crop", not siglip):
            c = size_field(cfg.get("crop_size", image_size), "crop_size")
            if "height" not in c or "width" not in c:
                raise MechscopeError(f"{where}crop_size: expected height and width, got {c!r}")
            crop = (
                _positive(c["height"], f"{where}crop_size.height"),
                _positive(c["width"], f"{where}crop_size.width"),
            )
        resample = RESAMPLE.get(cfg.get("resample", 3))  # bicubic where absent (transformers 5 for SigLIP too)
        if resample is None:
            raise MechscopeError(f"{where}resample: unsupported {cfg.get('resample')!r} (0, 2 or 3: nearest, bilinear, "
                                 "bicubic)")  # fmt: skip
        rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        default_mean, default_std = ((0.5,) * 3, (0.5,) * 3) if siglip else (OPENAI_MEAN, OPENAI_STD)
        if cfg.get("do_normalize", True):
            mean = _floats(cfg.get("image_mean", default_mean), f"{where}image_mean")
            std = _floats(cfg.get("image_std", default_std), f"{where}image_std")
        else:
            mean, std = (0.0,), (1.0,)
        mean, std = _per_channel(mean, channels, "image_mean", where), _per_channel(std, channels, "image_std", where)
        if any(s <= 0 for s in std):
            raise MechscopeError(f"{where}image_std: every value must be positive, got {list(std)}")
        out = crop or hw
        if out is not None and tuple(out) != (image_size, image_size):
            raise MechscopeError(f"{where}the processor makes {out[0]}×{out[1]} images but the model takes "
                                 f"{image_size}×{image_size}")  # fmt: skip
        return cls(image_size, channels, short, hw, resample, crop, rescale, mean, std)

    # ---- images of any size -> unit pixels --------------------------------------------------

    def pil_to_tensor(self, image) -> torch.Tensor:
        """A PIL image as [C,H,W] float 0..255 in the model's channels."""
        import numpy as np

        mode = "L" if self.channels == 1 else "RGB"
        a = np.asarray(image.convert(mode), dtype=np.float32)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        return torch.from_numpy(a.copy())

    def to_unit(self, images) -> torch.Tensor:
        """PIL images, or a tensor [B,C,H,W] of 0..255 values, -> unit pixels [B,C,S,S] in [0, 1]."""
        if isinstance(images, torch.Tensor):
            batch = [x for x in images.float()]
        else:
            batch = [self.pil_to_tensor(im) for im in images]
        return torch.stack([self._one(x) for x in batch]) if batch else torch.zeros(0, *self.shape)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.channels:
            x = grey(x) if self.channels == 1 else x.expand(self.channels, -1, -1)
        h, w = x.shape[-2:]
        target = None
        if self.shortest_edge is not None:
            s = self.shortest_edge
            target = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
        elif self.resize_hw is not None:
            target = self.resize_hw
        if target is not None and tuple(target) != (h, w):
            x = resize(x, target, self.resample)
        if self.crop_hw is not None:
            x = center_crop(x, self.crop_hw)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = resize(x, (self.image_size, self.image_size), self.resample)
        return (x * self.rescale).clamp(0.0, 1.0) if self.rescale != 1.0 else x

    def normalize(self, unit: torch.Tensor) -> torch.Tensor:
        """Unit pixels [B,C,S,S] -> the model's input (rescaled values minus the mean, over the sd)."""
        mean = torch.tensor(self.mean, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
        return (unit - mean) / std

    def __call__(self, images) -> torch.Tensor:
        """PIL images -> the model's input [B,C,S,S]."""
        return self.normalize(self.to_unit(images))


def resize(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """[C,H,W] (0..255) -> [C,h,w], antialiased as PIL, rounded and clipped to 8-bit levels as PIL leaves them."""
    kw = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
    y = F.interpolate(x[None], size=tuple(hw), mode=mode, **kw)[0]
    return y.round().clamp(0, 255)


def center_crop(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Centre crop [C,H,W] to ``hw`` as transformers' processors do (padding with zeros where the image is smaller,
    the image ceil(padding / 2) from the top and left, as ``transformers.image_transforms.center_crop`` puts it)."""
    ch, cw = hw
    h, w = x.shape[-2:]
    if h < ch or w < cw:
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        x = F.pad(x, (pw - pw // 2, pw // 2, ph - ph // 2, ph // 2))  # the odd pixel before: ceil(pad / 2)
        h, w = x.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    return x[:, top : top + ch, left : left + cw]


LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")


def grey(x: torch.Tensor) -> torch.Tensor:
    """[C,H,W] -> [1,H,W]: RGB as PIL's convert("L") weighs it (so a tensor and the same picture as a PIL image
    read alike; a plain mean made pure red 0.333 against PIL's 0.299), other channel counts averaged."""
    if x.shape[0] == 3:
        return torch.einsum("c,chw->hw", torch.tensor(LUMA, dtype=x.dtype, device=x.device), x)[None]
    return x.mean(0, keepdim=True)


def _positive(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise MechscopeError(f"{what}: expected a positive integer, got {v!r}")
    return v


def _floats(v, what: str) -> tuple[float, ...]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if (
        not isinstance(v, (list, tuple))
        or not v
        or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    ):
        raise MechscopeError(f"{what}: expected a list of numbers, got {v!r}")
    return tuple(float(x) for x in v)


def _per_channel(v: tuple[float, ...], channels: int, name: str, where: str) -> tuple[float, ...]:
    if len(v) == channels:
        return v
    if len(v) == 1:
        return v * channels
    if channels == 1:
        return (sum(v) / len(v),)
    raise MechscopeError(f"{where}{name}: {len(v)} values for a {channels}-channel model")


def read_preprocessor(directory: Path) -> dict:
    """``preprocessor_config.json`` of a checkpoint directory ({} when there is none)."""
    from mechscope.core.validate import read_json_object

    path = Path(directory) / "preprocessor_config.json"
    return read_json_object(path, "image preprocessor config") if path.is_file() else {}
