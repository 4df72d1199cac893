"""Devices and dtypes: defaults, what is not there, what a device cannot compute in (one line)."""

from __future__ import annotations

import pytest
import torch

from mechscope.core.errors import MechscopeError
from mechscope.lm.models import devices
from mechscope.lm.models.devices import resolve_device, resolve_dtype


def test_defaults_on_this_machine(monkeypatch):
    monkeypatch.delenv("MECHSCOPE_DEVICE", raising=False)
    best = resolve_device(None)
    if not torch.cuda.is_available():
        assert best.type in ("cpu", "mps")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    monkeypatch.setenv("MECHSCOPE_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu")


def test_dtypes_by_name():
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16 and resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype(torch.float32, cpu) == torch.float32
    with pytest.raises(MechscopeError, match="unsupported dtype 'float64'; supported: float32, bfloat16, float16"):
        resolve_dtype("float64", cpu)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tpu", "unknown device 'tpu'|unsupported device 'tpu'"),
        ("cuda:99", "device 'cuda:99' is not there"),
        ("gpu", "unknown device 'gpu'"),
    ],
)
def test_devices_that_are_not_there(spec, message):
    with pytest.raises(MechscopeError, match=message):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is there")
def test_cuda_without_a_gpu():
    with pytest.raises(MechscopeError, match="device 'cuda' is not there: no CUDA GPU is visible"):
        resolve_device("cuda")


def test_a_dtype_the_device_cannot_do(monkeypatch):
    def refuse(dtype, device):
        if dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(devices, "_probe", refuse)
    with pytest.raises(MechscopeError, match="device cpu cannot compute in float16 .*addmm.*try --dtype float32"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
