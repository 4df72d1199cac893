"""Devices and dtypes: what a user types, checked once, and a model spread over several devices.

``--device`` takes ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (default: ``$MECHSCOPE_DEVICE`` if
set, else the best one present); ``--dtype`` takes ``float32``, ``bfloat16`` or ``float16``
(default: float32 on the CPU, bfloat16 on a GPU). A device that is not there, or a dtype it
cannot compute in, is a one-line error before any weight is read.

``device_map`` (``"auto"`` or a dict from module names to devices, ``"disk"`` included) spreads
the blocks through Hugging Face ``accelerate``'s big-model machinery: ``infer_auto_device_map``
plans (every visible GPU, then CPU memory, then disk), the loader reads each tensor onto its
device, and ``dispatch_model`` attaches the hooks that move activations between devices and
page disk-offloaded weights in at forward time. Hook points and ``run_with_cache`` work across
the split (the hooks see each activation on the device its block runs on).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
import weakref

import torch

from mechscope.core.errors import MechscopeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def best_device() -> torch.device:
    """``$MECHSCOPE_DEVICE`` when set (tests pin the CPU with it), else CUDA, MPS, CPU: the first present."""
    if os.environ.get("MECHSCOPE_DEVICE"):
        return resolve_device(os.environ["MECHSCOPE_DEVICE"])
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _present() -> str:
    parts = ["cpu"]
    if torch.cuda.is_available():
        parts.append(f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        parts.append("mps")
    return ", ".join(parts)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A device that is there (``None``: the best one present)."""
    if spec is None:
        return best_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise MechscopeError(f"unknown device {spec!r}; expected cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MechscopeError(f"device {spec!r} is not there: no CUDA GPU is visible (devices here: {_present()})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MechscopeError(f"device {spec!r} is not there (devices here: {_present()})")
        return device
    if device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise MechscopeError(f"device {spec!r} is not there: no Apple GPU (devices here: {_present()})")
        return device
    raise MechscopeError(f"unsupported device {spec!r}; expected cpu, cuda, cuda:N or mps")


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype asked for (``None``: float32 on the CPU, bfloat16 on a GPU), checked on ``device``."""
    if spec is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            dtype = torch.float16
    elif isinstance(spec, torch.dtype):
        dtype = spec
    else:
        dtype = DTYPES.get(str(spec).removeprefix("torch."))
    if dtype not in DTYPES.values():
        raise MechscopeError(f"unsupported dtype {spec!r}; supported: {', '.join(DTYPES)}")
    check_dtype(dtype, device)
    return dtype


def _probe(dtype: torch.dtype, device: torch.device) -> None:
    """The operations a forward pass needs, once, tiny: raises if the device cannot do them."""
    x = torch.ones(2, 4, dtype=dtype, device=device)
    torch.nn.functional.layer_norm(x @ x.T, (2,)).softmax(-1)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise RuntimeError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support")


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    try:
        _probe(dtype, device)
    except (RuntimeError, TypeError) as e:
        name = str(dtype).removeprefix("torch.")
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MechscopeError(f"device {device} cannot compute in {name} ({reason}); try --dtype float32") from None


# ---------------------------------------------------------------------------------------------
# Beyond one device


def _normalise(target) -> str:
    if isinstance(target, int):
        return f"cuda:{target}"
    return str(target)


def plan_device_map(cfg, dtype: torch.dtype, device_map, max_memory: dict | None = None) -> dict[str, str]:
    """``"auto"`` (accelerate's plan over every visible GPU, then CPU, then disk) or a dict, checked."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import check_device_map

    from mechscope.lm.models.transformer import HookedTransformer

    with torch.device("meta"):
        meta = HookedTransformer(cfg)
    if device_map == "auto":
        device_map = infer_auto_device_map(meta, max_memory=max_memory, no_split_module_classes=["Block"], dtype=dtype)
    elif not isinstance(device_map, dict):
        raise MechscopeError(f"device_map must be 'auto' or a dict of module names to devices, got {device_map!r}")
    plan = _expand({name: _normalise(target) for name, target in device_map.items()}, meta)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # root parameters (W_E...) are keys accelerate calls unknown
            check_device_map(meta, plan)
    except ValueError as e:
        raise MechscopeError(f"device map does not cover the model: {e}") from None
    for target in set(plan.values()) - {"disk"}:
        resolve_device(target)
    return plan


def _expand(plan: dict[str, str], meta) -> dict[str, str]:
    """No whole-model entry (accelerate cannot offload the root), and the root's own parameters
    (W_E, W_pos, W_U_untied, b_U) in memory: the loader places them, accelerate does not page them."""
    if "" in plan:
        target = plan.pop("")
        for name, _ in [*meta.named_children(), *meta.named_parameters(recurse=False)]:
            plan.setdefault(name, target)
    for name, _ in meta.named_parameters(recurse=False):
        if plan.get(name) == "disk":
            plan[name] = "cpu"
    return plan


def placement(plan: dict[str, str]):
    """Where each parameter is read to: its longest-prefix entry in the plan (disk: CPU, then offloaded)."""

    def where(name: str) -> str:
        best = max((k for k in plan if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
        target = plan[best] if best is not None else "cpu"
        return "cpu" if target == "disk" else target

    return where


def dispatch(model, plan: dict[str, str], offload_dir: str | None = None):
    """accelerate's ``dispatch_model`` over the plan; a temporary offload folder when disk is used."""
    from accelerate import dispatch_model

    model.hf_device_map = plan
    if len(set(plan.values())) == 1 and "disk" not in plan.values():
        return model
    if "disk" in plan.values() and offload_dir is None:
        offload_dir = tempfile.mkdtemp(prefix="mechscope-offload-")
        weakref.finalize(model, shutil.rmtree, offload_dir, True)
    gpus = sorted(v for v in set(plan.values()) if v not in ("cpu", "disk"))
    acc_log = logging.getLogger("accelerate.big_modeling")
    level = acc_log.level
    acc_log.setLevel(logging.ERROR)  # "some parameters are on the meta device": expected, said in our log
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # root parameters (W_E, W_U) are placed by the loader, not by name
            model = dispatch_model(model, plan, main_device=gpus[0] if gpus else "cpu", offload_dir=offload_dir)
    finally:
        acc_log.setLevel(level)
    log.info("model spread over %s", ", ".join(sorted(set(plan.values()))))
    return model
