"""A model spread over devices through accelerate: a 2-block model over CPU memory and disk offload.

The split model gives the same logits, caches and interventions as the model in one piece;
hook points in the offloaded block work. The GPU checks (bf16 parity on CUDA, ``--device-map
auto`` over the visible GPUs) skip without CUDA.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from mechscope.core.hooks import attached_hooks, hooks, run_with_cache  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402
from tests.e2e.test_cli import assert_one_line_error, run_main  # noqa: E402
from tests.parity.families import tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SPLIT = {"W_E": "cpu", "W_U_untied": "disk", "blocks.0": "cpu", "blocks.1": "disk", "ln_final": "disk"}
NAMES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.1.hook_mlp_out"]


def drop_head(z, hook):
    z = z.clone()
    z[:, :, 1] = 0
    return z


@pytest.mark.parametrize("name", ["gemma2", "gpt_neox-parallel"])
def test_cpu_and_disk_split_computes_the_same(name, tiny_family):
    _, path = tiny_family(name)
    whole, _ = load_model(path, device="cpu")
    split, _ = load_model(path, device_map=SPLIT)
    assert split.blocks[1].attn.q.weight.is_meta and not split.blocks[0].attn.q.weight.is_meta  # paged in at use
    x = tokens()
    logits, cache = run_with_cache(split, x, names=NAMES)
    expected, expected_cache = run_with_cache(whole, x, names=NAMES)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    for n in NAMES:
        torch.testing.assert_close(cache[n], expected_cache[n], rtol=0, atol=0)
    with torch.no_grad(), hooks(split, fwd=[("blocks.1.attn.hook_z", drop_head)]):
        ablated = split(x)
    with torch.no_grad(), hooks(whole, fwd=[("blocks.1.attn.hook_z", drop_head)]):
        torch.testing.assert_close(ablated, whole(x), rtol=0, atol=0)
    assert (ablated - logits).abs().max() > 1e-2 and attached_hooks(split) == []
    # each head's output (computed only when hooked) from an offloaded block: read through o's own forward
    _, heads = run_with_cache(split, x, names=["blocks.1.attn.hook_result"])
    _, heads_whole = run_with_cache(whole, x, names=["blocks.1.attn.hook_result"])
    torch.testing.assert_close(heads["blocks.1.attn.hook_result"], heads_whole["blocks.1.attn.hook_result"])
    ours = split.generate(x[:1, :6], 8, stop_at_eos=False)
    assert torch.equal(ours, whole.generate(x[:1, :6], 8, stop_at_eos=False))


def test_auto_plan_offloads_what_does_not_fit(tiny_family):
    _, path = tiny_family("qwen2")
    whole, _ = load_model(path, device="cpu")
    auto, _ = load_model(path, device_map="auto", max_memory={"cpu": 60_000})  # bytes: less than the model
    assert "disk" in auto.hf_device_map.values()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(auto(x), whole(x), rtol=0, atol=0)


def test_cli_device_options(capsys, tiny_family):
    _, path = tiny_family("gemma")
    code, out, err = run_main(capsys, "lm", "inspect", "--model", str(path), "--device-map", "auto")
    assert code == 0, err
    code, out, err = run_main(capsys, "lm", "inspect", "--model", str(path), "--device", "cpu", "--dtype", "bfloat16")
    assert code == 0 and "dtype       bfloat16" in out and "device      cpu" in out, err
    for args, fragment in [
        (["--dtype", "float64"], "unsupported dtype 'float64'"),
        (["--device", "tpu"], "device 'tpu'"),
        (["--device", "cuda:99"], "device 'cuda:99' is not there"),
        (["--device-map", "balanced"], "--device-map takes 'auto'"),
        (["--device", "cpu", "--device-map", "auto"], "a device or a device map, not both"),
    ]:
        code, _, err = run_main(capsys, "lm", "generate", "--model", str(path), "--tokens", "5,6", *args)
        assert_one_line_error(code, err, fragment)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("name", ["gpt_neox-parallel", "gemma2", "qwen3"])
def test_gpu_bfloat16_parity(name, tiny_family):
    ref, path = tiny_family(name)
    model, _ = load_model(path, device="cuda", dtype="bfloat16")
    assert model.W_E.is_cuda and model.W_E.dtype == torch.bfloat16
    x = tokens(4, seed=1)
    with torch.no_grad():
        exact = ref(x).logits
        theirs = (copy.deepcopy(ref).to("cuda", torch.bfloat16)(x.cuda()).logits.float().cpu() - exact).abs()
        ours = (model(x).float().cpu() - exact).abs()
    assert ours.max() <= 1.5 * theirs.max() and ours.mean() <= 1.1 * theirs.mean()


@cuda
def test_gpu_device_map_auto(tiny_family):
    _, path = tiny_family("gemma3")
    whole, _ = load_model(path, device="cpu")
    auto, _ = load_model(path, device_map="auto", dtype="float32")
    assert any(v.startswith("cuda") for v in auto.hf_device_map.values())
    x = tokens()
    logits, cache = run_with_cache(auto, x, names=NAMES)
    torch.testing.assert_close(logits.cpu(), whole(x), rtol=1e-3, atol=1e-3)
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, x.shape[1], x.shape[1])
