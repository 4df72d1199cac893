"""A table of bad command lines across every command: each ends with exit 2 and one line.

Every row is something a user can get wrong (a value that does not parse, a number out of
range, a missing or corrupt file, a hook or layer the model does not have, an output location
that cannot be written). Each must give exactly one line on stderr, starting
``mechscope: error:``, exit status 2, no traceback, and leave nothing behind. Nothing here
trains or analyses: every check happens before the work starts (the ``quick_run`` fixture is
the one trained run, shared with other tests).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.fuzz import builders as B

R, HF, GG, T, W = "{run}", "{hf}", "{gguf}", "{text}", "{work}"

CNN_BAD = [
    # cnn train: parsing and ranges
    ("cnn", "train", "--epochs", "abc"),
    ("cnn", "train", "--epochs", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--epochs", "-3", "--out", f"{W}/o"),
    ("cnn", "train", "--lr", "inf", "--out", f"{W}/o"),
    ("cnn", "train", "--lr", "nan", "--out", f"{W}/o"),
    ("cnn", "train", "--lr", "1e30", "--out", f"{W}/o"),
    ("cnn", "train", "--lr", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--lr", "-0.1", "--out", f"{W}/o"),
    ("cnn", "train", "--seed", "18446744073709551616", "--out", f"{W}/o"),
    ("cnn", "train", "--seed", "-1", "--out", f"{W}/o"),
    ("cnn", "train", "--batch-size", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--shift", "-1", "--out", f"{W}/o"),
    ("cnn", "train", "--train-limit", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--max-steps", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--channels", "abc", "--out", f"{W}/o"),
    ("cnn", "train", "--channels", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--channels", "8,8,8,8,8", "--out", f"{W}/o"),
    ("cnn", "train", "--kernel-size", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--kernel-size", "99", "--out", f"{W}/o"),
    ("cnn", "train", "--padding", "-1", "--out", f"{W}/o"),
    ("cnn", "train", "--padding", "5", "--out", f"{W}/o"),  # --padding 100 ran until the kernel killed it
    ("cnn", "train", "--channels", "4100", "--out", f"{W}/o"),  # written, then refused by every command reading it
    ("cnn", "train", "--hidden", "1048577", "--out", f"{W}/o"),
    ("cnn", "train", "--pool", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--activation", "tanh", "--out", f"{W}/o"),
    ("cnn", "train", "--hidden", "0", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", "cifar", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", f"{W}/missing.npz", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", f"{W}/bad.npz", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", f"{W}/inf.npz", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", "idx", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", "idx", "--data-dir", f"{W}/nowhere", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", "idx", "--data-dir", f"{W}/idx_dir_file", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", "idx", "--data-dir", f"{W}/idx_bad", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", f"{W}/data.npz", "--class-names", f"{W}/missing.txt", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", f"{W}/data.npz", "--class-names", f"{W}/two_names.txt", "--out", f"{W}/o"),
    ("cnn", "train", "--dataset", f"{W}/data.npz", "--class-names", f"{W}/binary.bin", "--out", f"{W}/o"),
    ("cnn", "train", "--out", f"{W}/afile"),
    ("cnn", "train", "--out", f"{W}/full"),
    ("cnn", "train", "--out", f"{W}/afile/below"),
    ("cnn", "train", "--frobnicate"),
    ("cnn", "train", "extra-argument"),
    ("mnist", "train", "--epochs", "x"),
    # cnn evaluate
    (
        "cnn",
        "evaluate",
    ),
    ("cnn", "evaluate", "--run", f"{W}/nowhere"),
    ("cnn", "evaluate", "--run", f"{W}/afile"),
    ("cnn", "evaluate", "--run", f"{W}/run_model_null"),
    ("cnn", "evaluate", "--run", f"{W}/run_model_number"),
    ("cnn", "evaluate", "--run", f"{W}/run_config_list"),
    ("cnn", "evaluate", "--run", f"{W}/run_config_latin1"),
    ("cnn", "evaluate", "--run", f"{W}/run_channels_str"),
    ("cnn", "evaluate", "--run", f"{W}/run_no_weights"),
    ("cnn", "evaluate", "--run", f"{W}/run_other_weights"),  # read another run's weights: 0.7446 beside 0.79
    ("cnn", "evaluate", "--run", f"{W}/run_cut_weights"),
    ("cnn", "evaluate", "--run", f"{W}/run_nan_weights"),
    ("cnn", "evaluate", "--run", f"{W}/run_kind"),
    ("cnn", "evaluate", "--run", R, "--dataset", "cifar"),
    ("cnn", "evaluate", "--run", R, "--dataset", f"{W}/data.npz"),
    # cnn attribute
    ("cnn", "attribute", "--run", R, "--n", "0", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--n", "20000", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--n-faithfulness", "0", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--n-faithfulness", "99999", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--method", "magic", "--out", f"{W}/o"),
    (
        "cnn",
        "attribute",
        "--run",
        R,
        "--method",
        "saliency",
        "--method",
        "gradcam",
        "--layer",
        "hook_input",
        "--out",
        f"{W}/o",
    ),  # fmt: skip
    ("cnn", "attribute", "--run", R, "--layer", "conv9.hook_out", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--target", "11", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--target", "banana", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--out", f"{W}/full"),
    ("cnn", "attribute", "--run", R, "--out", f"{W}/afile"),
    ("cnn", "attribute", "--run", f"{W}/nowhere", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--n", "many"),
    # cnn visualize
    ("cnn", "visualize", "--run", R, "--steps", "0", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--steps", "-5", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--layer", "conv7.hook_out", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--units", "9999", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--units", "a,b", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--param", "wavelet", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--seed", "99999999999999999999999", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--out", f"{W}/full"),
    # cnn explain
    ("cnn", "explain", "--run", R, "--class", "42", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--class", "banana", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--class", "1", "--class", "1", "--out", f"{W}/o"),  # recorded [1, 1], ran one
    ("cnn", "explain", "--run", R, "--patch", "3", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--patch", "3,3", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--pairs", "0", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--tolerance", "-1", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--tolerance", "nan", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--test-limit", "0", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--circuit-layer", "conv9", "--out", f"{W}/o"),
    ("cnn", "explain", "--run", R, "--out", f"{W}/full"),
    ("cnn", "explain", "--run", f"{W}/run_model_null", "--out", f"{W}/o"),
    # cnn solu-compare
    ("cnn", "solu-compare", "--activations", "relu,tanh", "--out", f"{W}/o"),
    ("cnn", "solu-compare", "--activations", "relu,,gelu", "--out", f"{W}/o"),  # the empty item was dropped
    ("cnn", "solu-compare", "--epochs", "0", "--out", f"{W}/o"),
    ("cnn", "solu-compare", "--out", f"{W}/full"),
    ("cnn", "solu-compare", "--epochs", "99999999", "--out", f"{W}/o"),
    # absurd numbers and round-2 cases (issue 26)
    ("cnn", "train", "--epochs", "99999999", "--out", f"{W}/o"),
    ("cnn", "train", "--batch-size", "99999999", "--out", f"{W}/o"),
    ("cnn", "attribute", "--run", R, "--target", "²", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--units", ",", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--units", "1,1", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--layer", "conv2", "--layer", "conv2", "--out", f"{W}/o"),
    ("cnn", "visualize", "--run", R, "--steps", "99999999999", "--out", f"{W}/o"),
    # cnn blocks
    ("cnn", "blocks", "--run", R, "--threads", "100000", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--threads", "0", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--steps", "0", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--steps", "99999999", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--image", "-1", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--image", "999999", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--image", "3", "--typical", "2", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--groups", "0", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--grid", "0", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", f"{W}/nowhere", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", f"{W}/run_nan_weights", "--out", f"{W}/o"),
    ("cnn", "blocks", "--run", R, "--out", f"{W}/full"),
    # cnn tuning
    ("cnn", "tuning", "--run", R, "--seed", "-1", "--out", f"{W}/o"),
    ("cnn", "tuning", "--run", f"{W}/nowhere", "--out", f"{W}/o"),
    ("cnn", "tuning", "--run", f"{W}/run_cut_weights", "--out", f"{W}/o"),
    ("cnn", "tuning", "--run", R, "--out", f"{W}/full"),
    # cnn universality
    ("cnn", "universality", "--runs", R, "--out", f"{W}/o"),
    ("cnn", "universality", "--runs", R, "--runs", R, "--threads", "100000", "--out", f"{W}/o"),
    ("cnn", "universality", "--runs", R, "--runs", f"{W}/nowhere", "--out", f"{W}/o"),
    ("cnn", "universality", "--runs", R, "--runs", R, "--test-limit", "0", "--out", f"{W}/o"),
    ("cnn", "universality", "--runs", R, "--runs", R, "--vis-steps", "0", "--out", f"{W}/o"),
    ("cnn", "universality", "--runs", R, "--runs", R, "--out", f"{W}/full"),
]

LM_BAD = [
    # lm inspect
    ("lm", "inspect"),
    ("lm", "inspect", "--model", f"{W}/nowhere"),
    ("lm", "inspect", "--model", f"{W}/afile"),
    ("lm", "inspect", "--model", f"{W}/missing.gguf"),
    ("lm", "inspect", "--model", HF, "--hook", "blocks.0.attn.hook_rot_q", "--tokens", "1,2"),
    ("lm", "inspect", "--model", HF, "--hook", "blocks.9.hook_resid_pre", "--tokens", "1,2"),
    ("lm", "inspect", "--model", HF, "--hook", "blocks.0.hook_resid_pre", "--tokens", "1,2", "--prompt", "a"),
    ("lm", "inspect", "--model", HF, "--hook", "nonsense", "--tokens", "1,2"),
    ("lm", "inspect", "--model", HF, "--dtype", "float8"),
    ("lm", "inspect", "--model", HF, "--device", "tpu"),
    ("lm", "inspect", "--model", HF, "--device", "cpu", "--device-map", "auto"),
    ("lm", "inspect", "--model", HF, "--revision", "main"),
    ("lm", "inspect", "--model", f"{W}/hf_list"),
    ("lm", "inspect", "--model", f"{W}/hf_latin1"),
    ("lm", "inspect", "--model", f"{W}/hf_nhead0"),
    ("lm", "inspect", "--model", f"{W}/hf_nhead_str"),
    ("lm", "inspect", "--model", f"{W}/hf_fewer_layers"),
    ("lm", "inspect", "--model", f"{W}/hf_model_type"),
    ("lm", "inspect", "--model", f"{W}/hf_no_weights"),
    ("lm", "inspect", "--model", f"{W}/hf_cut_weights"),
    ("lm", "inspect", "--model", f"{W}/hf_bad_dtype"),
    ("lm", "inspect", "--model", f"{W}/gguf_unknown_type.gguf"),
    ("lm", "inspect", "--model", f"{W}/gguf_no_block_count.gguf"),
    ("lm", "inspect", "--model", f"{W}/gguf_magic.gguf"),
    ("lm", "inspect", "--model", f"{W}/gguf_cut.gguf"),
    ("lm", "inspect", "--model", f"{W}/gguf_extra_tensor.gguf"),
    # lm generate
    ("lm", "generate", "--model", HF),
    ("lm", "generate", "--model", HF, "--prompt", "a", "--tokens", "1"),
    ("lm", "generate", "--model", HF, "--tokens", "1,x"),
    ("lm", "generate", "--model", HF, "--tokens", "1,99999999999999999999999"),
    ("lm", "generate", "--model", HF, "--tokens", "-1"),
    ("lm", "generate", "--model", HF, "--tokens", "100000"),
    ("lm", "generate", "--model", HF, "--prompt", "a", "--max-new-tokens", "-1"),
    ("lm", "generate", "--model", HF, "--prompt", ""),
    ("lm", "generate", "--model", HF, "--prompt", "a" * 40),
    ("lm", "generate", "--model", HF, "--tokens", "1,2", "--max-new-tokens", "1000"),  # cut at the context, silently
    ("lm", "generate", "--model", GG, "--tokens", "1,2", "--max-new-tokens", "abc"),
    # lm heads
    ("lm", "heads", "--model", HF, "--batch", "1000000000", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--batch", "0", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--n", "0", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--n", "1", "--out", f"{W}/o"),  # no second-copy loss: a report of NaN
    ("lm", "heads", "--model", HF, "--batch", "1", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--n", "100000", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--seed", "99999999999999999999999", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--show", "9.9", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--show", "x", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--top-k", "-1", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--text", f"{W}/missing.txt", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--text", f"{W}/binary.bin", "--out", f"{W}/o"),
    ("lm", "heads", "--model", HF, "--out", f"{W}/full"),
    ("lm", "heads", "--model", HF, "--out", f"{W}/afile"),
    # lm train-toy
    ("lm", "train-toy", "--layers", "3", "--out", f"{W}/o"),
    ("lm", "train-toy", "--layers", "0", "--out", f"{W}/o"),
    ("lm", "train-toy", "--data", "pictures", "--out", f"{W}/o"),
    ("lm", "train-toy", "--steps", "0", "--out", f"{W}/o"),
    ("lm", "train-toy", "--seed", "18446744073709551616", "--out", f"{W}/o"),
    ("lm", "train-toy", "--mlp", "swish", "--out", f"{W}/o"),
    ("lm", "train-toy", "--d-mlp", "0", "--mlp", "gelu", "--out", f"{W}/o"),
    ("lm", "train-toy", "--data", "text", "--text", f"{W}/missing.txt", "--out", f"{W}/o"),
    ("lm", "train-toy", "--data", "text", "--text", f"{W}/empty.txt", "--out", f"{W}/o"),
    ("lm", "train-toy", "--data", "text", "--text", f"{W}/binary.bin", "--out", f"{W}/o"),
    ("lm", "train-toy", "--data", "text", "--text", f"{W}/short.txt", "--out", f"{W}/o"),
    ("lm", "train-toy", "--device", "cuda:7", "--out", f"{W}/o"),
    ("lm", "train-toy", "--dtype", "float16", "--out", f"{W}/o"),
    ("lm", "train-toy", "--out", f"{W}/full"),
    # lm circuits
    ("lm", "circuits", "--model", HF, "--head", "9.0", "--out", f"{W}/o"),
    ("lm", "circuits", "--model", HF, "--head", "zero", "--out", f"{W}/o"),
    ("lm", "circuits", "--model", HF, "--head", "-0.1", "--out", f"{W}/o"),  # int("-0") is 0: read as head 0.1
    ("lm", "circuits", "--model", f"{W}/nowhere", "--out", f"{W}/o"),
    ("lm", "circuits", "--model", HF, "--out", f"{W}/full"),
    # lm neurons
    ("lm", "neurons", "--model", HF, "--layer", "7", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--neuron", "0.99999", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--neuron", "x", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--k", "0", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--sequences", "0", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--length", "1", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--site", "nowhere", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--text", f"{W}/binary.bin", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--out", f"{W}/full"),
    # lm solu-compare
    ("lm", "solu-compare", "--steps", "0", "--out", f"{W}/o"),
    ("lm", "solu-compare", "--k", "999999", "--out", f"{W}/o"),  # every position a "top" one: 0% monosemantic
    ("lm", "solu-compare", "--layers", "9", "--out", f"{W}/o"),
    ("lm", "solu-compare", "--text", f"{W}/missing.txt", "--out", f"{W}/o"),
    ("lm", "solu-compare", "--out", f"{W}/full"),
    # absurd numbers and files a loader must refuse (issue 26)
    ("lm", "train-toy", "--steps", "99999999999", "--out", f"{W}/o"),
    ("lm", "train-toy", "--data", "text", "--text", f"{W}/one_char.txt", "--out", f"{W}/o"),
    ("lm", "solu-compare", "--threads", "100000", "--out", f"{W}/o"),
    ("lm", "neurons", "--model", HF, "--k", "99999999", "--out", f"{W}/o"),
    ("lm", "inspect", "--model", f"{W}/hf_int_tensor"),
    ("lm", "circuits", "--model", HF, "--prompt", "", "--out", f"{W}/o"),
    # the groups themselves
    ("frobnicate",),
    ("lm", "frobnicate"),
    ("cnn", "frobnicate"),
]

TABLE = CNN_BAD + LM_BAD


def _write_run_variant(src: Path, dest: Path, change) -> None:
    shutil.copytree(src, dest)
    change(dest)


def _set_config(**fields):
    def change(run: Path) -> None:
        cfg = json.loads((run / "config.json").read_text())
        for k, v in fields.items():
            if "." in k:
                a, b = k.split(".")
                cfg[a][b] = v
            else:
                cfg[k] = v
        (run / "config.json").write_text(json.dumps(cfg))

    return change


@pytest.fixture(scope="module")
def work(tmp_path_factory, quick_run) -> dict[str, str]:
    """Every broken input the table names, made once."""
    import numpy as np
    import torch
    from safetensors.torch import load_file, save_file

    w = tmp_path_factory.mktemp("bad")
    (w / "afile").write_text("not a directory\n")
    (w / "full").mkdir()
    (w / "full" / "keep.txt").write_text("mine\n")
    B.write_npz(w / "data.npz")
    (w / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    arrays = B.image_arrays()
    arrays["x_test"] = arrays["x_test"].astype(np.float32)
    arrays["x_test"][0, 0, 0] = np.inf
    np.savez(w / "inf.npz", **arrays)
    (w / "idx_dir_file").write_text("x")
    B.write_idx_folder(w / "idx_bad", gz=False)
    (w / "idx_bad" / "train-images-idx3-ubyte").unlink()
    (w / "idx_bad" / "train-images-idx3-ubyte").mkdir()  # the IDX path is a directory
    (w / "two_names.txt").write_text("a\nb\n")
    (w / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (w / "empty.txt").write_text("")
    (w / "short.txt").write_text("abc\n")
    (w / "one_char.txt").write_text("a" * 5000)
    run = Path(quick_run)
    _write_run_variant(run, w / "run_model_null", _set_config(model=None))
    _write_run_variant(run, w / "run_model_number", _set_config(model=3))
    _write_run_variant(run, w / "run_config_list", lambda r: (r / "config.json").write_text("[1, 2]"))
    _write_run_variant(run, w / "run_config_latin1", lambda r: (r / "config.json").write_bytes(b'{"kind": "cnn\xe9"}'))
    _write_run_variant(run, w / "run_channels_str", _set_config(**{"model.channels": "16,32"}))
    _write_run_variant(run, w / "run_kind", _set_config(kind="toy"))
    _write_run_variant(run, w / "run_no_weights", lambda r: (r / "model.safetensors").unlink())
    _write_run_variant(run, w / "run_other_weights", _set_config(weights_sha256="0" * 64))  # weights swapped in

    def cut(r: Path) -> None:
        raw = (r / "model.safetensors").read_bytes()
        (r / "model.safetensors").write_bytes(raw[: len(raw) // 2])

    _write_run_variant(run, w / "run_cut_weights", cut)

    def nan(r: Path) -> None:
        state = load_file(str(r / "model.safetensors"))
        first = sorted(state)[0]
        state[first].view(-1)[0] = float("nan")
        save_file(state, str(r / "model.safetensors"))
        from types import SimpleNamespace

        from mechscope.core.outputs import weights_hash

        cfg = json.loads((r / "config.json").read_text())  # the record says these weights: the NaN is what is wrong
        cfg["weights_sha256"] = weights_hash(SimpleNamespace(state_dict=lambda: state))
        (r / "config.json").write_text(json.dumps(cfg))

    _write_run_variant(run, w / "run_nan_weights", nan)

    hf = B.write_hf_dir(w / "hf")

    def hf_variant(name: str, change) -> None:
        shutil.copytree(hf, w / name)
        change(w / name)

    def hf_config(**fields):
        return lambda d: (d / "config.json").write_text(json.dumps(B.gpt2_config() | fields))

    hf_variant("hf_list", lambda d: (d / "config.json").write_text("[]"))
    hf_variant("hf_latin1", lambda d: (d / "config.json").write_bytes(b'{"model_type": "gpt2\xff"}'))
    hf_variant("hf_nhead0", hf_config(n_head=0))
    hf_variant("hf_nhead_str", hf_config(n_head="2"))
    hf_variant("hf_model_type", hf_config(model_type="bert"))
    hf_variant("hf_no_weights", lambda d: (d / "model.safetensors").unlink())

    def more_layers(d: Path) -> None:  # weights of two layers, a config of one
        state = load_file(str(d / "model.safetensors"))
        state |= {k.replace(".h.0.", ".h.1."): v.clone() for k, v in state.items() if ".h.0." in k}
        save_file(state, str(d / "model.safetensors"))

    hf_variant("hf_fewer_layers", more_layers)
    hf_variant(
        "hf_cut_weights", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300])
    )

    def bad_dtype(d: Path) -> None:
        raw = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(raw.replace(b'"F32"', b'"X32"', 1))

    hf_variant("hf_bad_dtype", bad_dtype)

    def int_tensor(d: Path) -> None:  # an integer tensor where a weight should be
        state = load_file(str(d / "model.safetensors"))
        first = sorted(k for k in state if k.endswith("weight"))[0]
        state[first] = state[first].to(torch.int32)
        save_file(state, str(d / "model.safetensors"))

    hf_variant("hf_int_tensor", int_tensor)
    meta, tensors = B.gguf_parts()
    gg = B.write_gguf(w / "tiny.gguf")
    bad_type = [(n, s, 77 if i == 0 else q, d) for i, (n, s, q, d) in enumerate(tensors)]
    (w / "gguf_unknown_type.gguf").write_bytes(B.gguf_bytes(meta, bad_type))
    (w / "gguf_no_block_count.gguf").write_bytes(
        B.gguf_bytes([m for m in meta if m[0] != "llama.block_count"], tensors)
    )
    (w / "gguf_magic.gguf").write_bytes(b"GGUX" + gg.read_bytes()[4:])
    (w / "gguf_cut.gguf").write_bytes(gg.read_bytes()[:200])
    (w / "gguf_extra_tensor.gguf").write_bytes(
        B.gguf_bytes(meta, tensors + [("rope_freqs.weight", (4,), 0, b"\0" * 16)])
    )
    text = B.write_text(w / "text.txt")
    return {"run": str(run), "hf": str(hf), "gguf": str(gg), "text": str(text), "work": str(w)}


def test_table_size():
    assert len(TABLE) >= 100
    assert len(set(TABLE)) == len(TABLE), "a row appears twice"


@pytest.mark.parametrize("row", TABLE, ids=[" ".join(r)[:80] for r in TABLE])
def test_bad_invocation(row, work, capsys, monkeypatch, tmp_path):
    from mechscope.cli import main

    monkeypatch.chdir(tmp_path)  # anything a command writes by default lands here
    args = [a.format(**work) for a in row]
    before = sorted(os.listdir(work["work"]))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, f"exit {exit_info.value.code}; stderr: {err[-800:]}"
    assert len(lines) == 1, f"{len(lines)} lines on stderr: {err[-800:]}"
    assert lines[0].startswith("mechscope: error: "), lines[0]
    assert "Traceback" not in err + out
    assert sorted(os.listdir(work["work"])) == before, "a file appeared beside the inputs"
    assert not list(tmp_path.iterdir()), f"written into the working directory: {list(tmp_path.iterdir())}"
    assert sorted(os.listdir(Path(work["work"]) / "full")) == ["keep.txt"]
