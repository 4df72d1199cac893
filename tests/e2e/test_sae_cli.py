"""`mechscope cnn sae ...` and `mechscope lm sae ...` end to end at tiny sizes, bad input (one line, exit 2, nothing
half-written), a SAELens-layout directory written by SAELens' conventions loading and splicing, and harvesting
data-parallel over two CPU processes equal to one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mechscope.cnn.methods.sae import CnnSaeDashboards, CnnSaeEvaluation, CnnSaeHarvest, CnnSaeTraining
from mechscope.lm.methods.sae import LmSaeDashboards, LmSaeEvaluation, LmSaeHarvest, LmSaeTraining
from tests.e2e.reports import check_report
from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.gloo import as_torchrun, done, free_port, spawn
from tests.records import assert_round_trip

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n\n") * 30  # fmt: skip
TINY = dict(d_model=32, n_heads=2, n_ctx=32, vocab=16, batch=8, checkpoints=2, min_span=4, warmup=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, text_file):
    """A 1-layer GELU toy trained for a few steps on the text (through the library)."""
    from mechscope.lm.pipelines.toy import train_toy_run
    from mechscope.lm.toy import ToyConfig

    out = tmp_path_factory.mktemp("toy") / "toy-gelu"
    train_toy_run(ToyConfig(**TINY, layers=1, data="text", steps=5, mlp="gelu", d_mlp=48), out, text_file,
                  control=False, progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def cnn_chain(quick_run, tmp_path_factory):
    """cnn sae harvest, train, evaluate, show through the CLI on the quick MNIST run."""
    from mechscope.cli import main

    tmp = tmp_path_factory.mktemp("cnn-sae")
    outputs = {}
    for name, args in (
        ("harvest", ["harvest", "--run", str(quick_run), "--out", str(tmp / "h"), "--limit", "600", "--shard-rows",
                     "2048"]),
        ("train", ["train", "--store", str(tmp / "h"), "--out", str(tmp / "sae"), "--expansion", "4", "--k", "4",
                   "--batch-size", "1024", "--epochs", "2"]),
        ("evaluate", ["evaluate", "--run", str(quick_run), "--sae", str(tmp / "sae"), "--limit", "500"]),
        ("show", ["show", "--run", str(quick_run), "--sae", str(tmp / "sae"), "--limit", "400", "--featvis-steps", "8",
                  "--selective", "2", "--random", "1"]),
    ):  # fmt: skip
        try:
            main(["cnn", "sae", *args])
        except SystemExit as e:
            assert not e.code, f"cnn sae {name} failed"
        outputs[name] = True
    return tmp


def test_cnn_sae_chain(cnn_chain, quick_run):
    tmp = cnn_chain
    h = assert_round_trip(tmp / "h" / "harvest.json", CnnSaeHarvest)
    assert h["hook"] == "conv2.hook_out" and h["rows"] == 600 * 16 and h["width"] == 32
    t = assert_round_trip(tmp / "sae" / "training.json", CnnSaeTraining)
    assert t["d_sae"] == 128 and t["architecture"] == "topk" and t["steps"] == 2 * (9600 // 1024)
    cfg = json.loads((tmp / "sae" / "cfg.json").read_text())
    assert cfg["hook_name"] == "conv2.hook_out" and cfg["architecture"] == "topk" and cfg["k"] == 4
    e = assert_round_trip(tmp / "sae" / "evaluation" / "evaluation.json", CnnSaeEvaluation)
    assert e["effect"]["images"] == 500 and e["metrics"]["l0"] <= 4.0
    assert 0 < e["effect"]["acc_spliced"] <= 1 and e["effect"]["acc_clean"] > 0.5
    d = assert_round_trip(tmp / "sae" / "dashboards" / "dashboards.json", CnnSaeDashboards)
    assert d["comparison"]["channels"]["units"] == 32 and len(d["latents"]) >= 3
    assert check_report(tmp / "sae" / "dashboards" / "report.html") >= 3


def test_lm_context_defaults_to_the_models_and_is_refused_above_it(capsys, tmp_path, toy_run, text_file):
    """The toy's context is 32 tokens: --context 33 was capped to 32 without a word; now refused. The default (128)
    takes the model's 32; lm neurons' --length likewise (default 64)."""
    base = ("--model", str(toy_run), "--text", str(text_file))
    code, _, err = run_main(capsys, "lm", "sae", "harvest", *base, "--hook", "blocks.0.hook_resid_post", "--context",
                            "33", "--out", str(tmp_path / "h33"))  # fmt: skip
    assert_one_line_error(code, err, "--context 33 is longer than the model's context of 32 tokens")
    code, _, err = run_main(capsys, "lm", "sae", "harvest", *base, "--hook", "blocks.0.hook_resid_post", "--contexts",
                            "3", "--shard-rows", "64", "--out", str(tmp_path / "h"))  # fmt: skip
    assert code == 0, err
    assert assert_round_trip(tmp_path / "h" / "harvest.json", LmSaeHarvest)["context"] == 32
    code, _, err = run_main(capsys, "lm", "neurons", *base, "--length", "40", "--out", str(tmp_path / "n"))
    assert_one_line_error(code, err, "--length 40 is longer than the model's context of 32 tokens")


def test_lm_sae_chain(capsys, tmp_path, toy_run, text_file):
    code, out, err = run_main(
        capsys, "lm", "sae", "harvest", "--model", str(toy_run), "--text", str(text_file), "--hook",
        "blocks.0.hook_resid_post", "--transcoder", "blocks.0.mlp.hook_in:blocks.0.hook_mlp_out", "--context", "32",
        "--shard-rows", "512", "--out", str(tmp_path / "h"),
    )  # fmt: skip
    assert code == 0, err
    assert "tokens/s" in out
    h = assert_round_trip(tmp_path / "h" / "harvest.json", LmSaeHarvest)
    assert h["bos"] is None and h["skip_first"] == 0  # characters: no BOS
    assert [s["width"] for s in h["stores"]] == [32, 64]
    code, out, err = run_main(
        capsys, "lm", "sae", "train", "--store", str(tmp_path / "h" / "blocks.0.hook_resid_post"), "--out",
        str(tmp_path / "sae"), "--expansion", "2", "--k", "4", "--batch-size", "256", "--architecture", "batchtopk",
    )  # fmt: skip
    assert code == 0, err
    assert_round_trip(tmp_path / "sae" / "training.json", LmSaeTraining)
    code, out, err = run_main(
        capsys, "lm", "sae", "train", "--store",
        str(tmp_path / "h" / "blocks.0.mlp.hook_in__to__blocks.0.hook_mlp_out"), "--out", str(tmp_path / "tc"),
        "--expansion", "2", "--k", "4", "--batch-size", "256", "--skip",
    )  # fmt: skip
    assert code == 0, err
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_transcoder" or cfg["architecture"].endswith("skip_transcoder")
    assert cfg["hook_name_out"] == "blocks.0.hook_mlp_out"
    for d in ("sae", "tc"):
        code, out, err = run_main(capsys, "lm", "sae", "evaluate", "--model", str(toy_run), "--sae", str(tmp_path / d),
                                  "--text", str(text_file), "--context", "32", "--contexts", "6")  # fmt: skip
        assert code == 0, err
        assert "recovered" in out
        assert_round_trip(tmp_path / d / "evaluation" / "evaluation.json", LmSaeEvaluation)
        page = (tmp_path / d / "evaluation" / "report.html").read_text()
        assert "KL recovered 1 − KL_spliced / KL_zero" in page and "dead: the share of the latents" in page
    # a transcoder's target before its input, or the input itself: a KeyError traceback, or a splice of nothing
    read = ("--model", str(toy_run), "--text", str(text_file), "--context", "32", "--contexts", "4")
    for target, fragment in (("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre runs before blocks.0.mlp.hook_in"),
                             ("blocks.0.mlp.hook_in", "another hook than its input")):
        for command in ("evaluate", "show"):
            code, _, err = run_main(capsys, "lm", "sae", command, *read, "--sae", str(tmp_path / "tc"), "--target",
                                    target, "--out", str(tmp_path / f"bad-{command}"))  # fmt: skip
            assert_one_line_error(code, err, fragment)
            assert code == 2 and not (tmp_path / f"bad-{command}").exists()
    for command, what in (("harvest", ("--hook", "blocks.0.hook_resid_post")), ("evaluate", ("--sae", str(tmp_path
                          / "sae")))):  # --bos and --no-bos gave the same activations: the toy reads no BOS
        code, _, err = run_main(capsys, "lm", "sae", command, *read, *what, "--bos", "--out", str(tmp_path / "b"))
        assert_one_line_error(code, err, "its text is read without a BOS token here")
    code, _, err = run_main(capsys, "lm", "sae", "show", *read, "--sae", str(tmp_path / "sae"), "--induction", "65",
                            "--out", str(tmp_path / "bad-show"))  # fmt: skip
    assert_one_line_error(code, err, "--induction 65: the dictionary has 64 latents")
    code, _, err = run_main(capsys, "lm", "sae", "harvest", *read, "--transcoder",
                            "blocks.0.hook_mlp_out:blocks.0.mlp.hook_in", "--out", str(tmp_path / "bad-h"))  # fmt: skip
    assert_one_line_error(code, err, "blocks.0.mlp.hook_in runs before blocks.0.hook_mlp_out")
    code, out, err = run_main(capsys, "lm", "sae", "show", "--model", str(toy_run), "--sae", str(tmp_path / "sae"),
                              "--text", str(text_file), "--context", "32", "--contexts", "12", "--latent", "3",
                              "--random", "2", "--induction", "2")  # fmt: skip
    assert code == 0, err
    d = assert_round_trip(tmp_path / "sae" / "dashboards" / "dashboards.json", LmSaeDashboards)
    assert d["latents"][0]["latent"] == 3 and d["latents"][0]["why"] == "asked"
    assert check_report(tmp_path / "sae" / "dashboards" / "report.html") >= 1


# ---- a directory in SAELens' own layout (as SAELens 5 writes a standard SAE) ------------------------------------


def test_saelens_layout_directory_loads_and_splices(capsys, tmp_path, toy_run, text_file):
    where = tmp_path / "saelens"
    where.mkdir()
    d_in, d_sae = 32, 64
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.1, "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.1, "b_dec": torch.zeros(d_in)},
              str(where / "sae_weights.safetensors"))  # fmt: skip
    (where / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "model_name": "toy", "hook_name": "blocks.0.hook_resid_pre", "hook_layer": 0, "hook_head_index": None,
        "activation_fn_str": "relu", "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
        "sae_lens_training_version": "5.0.0", "prepend_bos": True, "dataset_path": "x", "context_size": 32,
        "normalize_activations": "none",
    }))  # fmt: skip
    code, out, err = run_main(capsys, "lm", "sae", "evaluate", "--model", str(toy_run), "--sae", str(where), "--text",
                              str(text_file), "--context", "32", "--contexts", "4", "--out",
                              str(tmp_path / "ev"))  # fmt: skip
    assert code == 0, err
    e = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert e["hook"] == "blocks.0.hook_resid_pre" and e["architecture"] == "relu" and e["d_sae"] == d_sae


# ---- bad input: one line, exit 2, nothing half-written ---------------------------------------------------------


def _nothing_written(path) -> None:
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")]
    assert not (path.parent / f"{path.name}.partial").exists()


def test_bad_input_is_one_line(capsys, tmp_path, quick_run, cnn_chain, toy_run, text_file):
    sae = cnn_chain / "sae"
    cases = [
        (["cnn", "sae", "harvest", "--run", str(quick_run), "--hook", "conv9.hook_out"], "unknown hook point"),
        (["lm", "sae", "harvest", "--model", str(toy_run), "--text", str(text_file), "--hook", "blocks.7.hook_z"],
         "unknown hook point"),
        (["cnn", "sae", "evaluate", "--run", str(quick_run), "--sae", str(sae), "--hook", "conv1.hook_out"],
         "d_in=32; conv1.hook_out has 16 channels"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--d-sae", "16", "--k", "20"], "k <= d_sae"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--architecture", "relu", "--l1", "-1"],
         "--l1 must be a finite number >= 0"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--d-sae", "16", "--expansion", "4"],
         "give --d-sae or --expansion, not both"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--steps", "0"], "--steps must be an integer from 1"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--batch-size", "0"],
         "--batch-size must be an integer from 1"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--epochs", "0"],
         "--epochs must be an integer from 1"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--lr", "1e39"],  # overflowed in Adam: traceback
         "--lr must be in (0, 10], got 1e+39"),
        (["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--lr", "0"], "--lr must be in (0, 10], got 0.0"),
        (["cnn", "sae", "show", "--run", str(quick_run), "--sae", str(sae), "--random", "99999"],  # showed the alive
         "--random 99,999: the dictionary has"),
        (["lm", "sae", "harvest", "--model", str(toy_run), "--text", str(tmp_path / "empty.txt"), "--hook",
          "blocks.0.hook_resid_post"], "empty"),
    ]  # fmt: skip
    (tmp_path / "empty.txt").write_text("")
    for i, (args, fragment) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, _, err = run_main(capsys, *args, "--out", str(out))
        assert code == 2, (args, err)
        assert_one_line_error(code, err, fragment)
        _nothing_written(out)
    # a corrupt cfg.json, a corrupt weights file
    for name, damage in (("cfg.json", "{not json"), ("sae_weights.safetensors", "garbage")):
        bad = tmp_path / f"bad-{name}"
        bad.mkdir()
        for f in ("cfg.json", "sae_weights.safetensors"):
            (bad / f).write_bytes((sae / f).read_bytes())
        (bad / name).write_text(damage)
        out = tmp_path / f"ev-{name}"
        code, _, err = run_main(capsys, "cnn", "sae", "evaluate", "--run", str(quick_run), "--sae", str(bad), "--out",
                                str(out))  # fmt: skip
        assert_one_line_error(code, err, name)
        assert code == 2
        _nothing_written(out)


def test_resume_from_a_checkpoint_of_other_settings_is_refused(capsys, tmp_path, cnn_chain):
    out = tmp_path / "sae"
    args = ["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--out", str(out), "--d-sae", "64", "--k", "4",
            "--batch-size", "1024", "--checkpoint-every", "2", "--steps", "4"]  # fmt: skip
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    # a finished run leaves no staging folder; make an interrupted one: checkpoints, then a different k
    code, _, err = run_main(capsys, *args[:-2], "--steps", "2", "--out", str(tmp_path / "sae2"))
    assert code == 0
    staging = tmp_path / "sae3.partial"
    (staging / "checkpoints").mkdir(parents=True)
    from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, train
    from mechscope.core.dictionaries.staged import store_reader

    cfg = DictionaryConfig(d_in=32, d_sae=64, architecture="topk", k=4,
                           normalize_activations="expected_average_only_in")
    tc = TrainConfig(lr=4e-4, max_steps=2, checkpoint_every=2, checkpoint_dir=str(staging / "checkpoints"),
                     progress=False)  # fmt: skip
    train(cfg, store_reader(cnn_chain / "h" / "store", cfg, 1024), tc)
    code, _, err = run_main(capsys, "cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--out",
                            str(tmp_path / "sae3"), "--d-sae", "64", "--k", "5", "--batch-size", "1024",
                            "--checkpoint-every", "2", "--steps", "4", "--resume")  # fmt: skip
    assert_one_line_error(code, err, "k=4", "k=5", "resume with the same settings")
    assert code == 2 and not (tmp_path / "sae3").exists()
    code, _, err = run_main(capsys, "cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--out",
                            str(tmp_path / "sae3"), "--d-sae", "64", "--k", "4", "--batch-size", "1024",
                            "--checkpoint-every", "2", "--steps", "4", "--resume")  # fmt: skip
    assert code == 0, err
    t = json.loads((tmp_path / "sae3" / "training.json").read_text())
    assert t["resumed_from_step"] == 2 and t["steps"] == 4
    assert not staging.exists()


# ---- two processes ----------------------------------------------------------------------------------------


def _harvest_worker(rank: int, world: int, port: int, run: str, out: str, marks: str) -> None:
    as_torchrun(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from mechscope.cnn.pipelines.sae import sae_harvest_run

    try:
        sae_harvest_run(run, out, limit=300, batch=64, shard_rows=1024, progress=False, distributed=True)
    finally:
        dist.destroy_process_group()
    done(marks, rank)


def test_harvest_on_two_processes_equals_one(tmp_path, quick_run):
    """Two gloo processes (torchrun's environment) write the store one process writes: every shard's rows equal
    within 1e-6 (the forward on half a batch may round differently; measured: bit-identical)."""
    from safetensors.torch import load_file

    from mechscope.cnn.pipelines.sae import sae_harvest_run

    one = tmp_path / "one"
    sae_harvest_run(quick_run, one, limit=300, batch=64, shard_rows=1024, progress=False, distributed=False)
    two = tmp_path / "two"
    spawn(_harvest_worker, (2, free_port(), str(quick_run), str(two), str(tmp_path)), tmp_path)
    m1 = json.loads((one / "store" / "manifest.json").read_text())
    m2 = json.loads((two / "store" / "manifest.json").read_text())
    assert m1["shards"] == m2["shards"] and m1["rows"] == 300 * 16
    for s in m1["shards"]:
        a = load_file(str(one / "store" / s["file"]))["activations"]
        b = load_file(str(two / "store" / s["file"]))["activations"]
        assert float((a - b).abs().max()) <= 1e-6
    h = json.loads((two / "harvest.json").read_text())
    assert h["world_size"] == 2


def test_distributed_outside_torchrun_is_one_line_naming_the_launch(capsys, tmp_path, quick_run, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "h"
    args = ("cnn", "sae", "harvest", "--run", str(quick_run), "--out", str(out), "--distributed")
    code, _, err = run_main(capsys, *args)
    assert_one_line_error(code, err, "--distributed expects to run under torchrun", "-m mechscope -- ")
    assert code == 2 and not out.exists()


def test_the_documented_torchrun_line_reaches_mechscope_intact():
    """torchrun's own parser: with ``--`` after ``mechscope`` the command's options pass through untouched (without
    it torchrun stops at ``--run``, an abbreviation of its ``--run-path``); both wings' pages write it that way."""
    from pathlib import Path

    from torch.distributed.run import get_args_parser

    for command in (["cnn", "sae", "harvest", "--run", "R", "--limit", "8", "--distributed"],
                    ["lm", "sae", "harvest", "--model", "M", "--hook", "blocks.0.hook_resid_post", "--distributed"],
                    ["cnn", "sae", "train", "--store", "S", "--k", "4", "--resume", "--distributed"]):  # fmt: skip
        args = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "mechscope", "--", *command])
        assert args.module and args.training_script == "mechscope" and args.training_script_args == command
    docs = Path(__file__).resolve().parents[2] / "docs"
    pages = [(docs / wing / "sparse-dictionaries.md").read_text() for wing in ("cnn", "lm")]
    lines = [line for page in pages for line in page.splitlines() if line.startswith("torchrun")]
    assert len(lines) == 2 and all(" -m mechscope -- " in line for line in lines)


def test_resume_with_another_batch_size_is_refused(capsys, tmp_path, cnn_chain):
    args = ["cnn", "sae", "train", "--store", str(cnn_chain / "h"), "--out", str(tmp_path / "sae"), "--d-sae", "64",
            "--k", "4", "--checkpoint-every", "2", "--steps", "4"]  # fmt: skip
    from mechscope.core.dictionaries import DictionaryConfig, TrainConfig
    from mechscope.core.dictionaries.staged import checkpoints_of, train_from_store

    cfg = DictionaryConfig(d_in=32, d_sae=64, architecture="topk", k=4,
                           normalize_activations="expected_average_only_in")  # fmt: skip
    tc = TrainConfig(lr=4e-4, max_steps=2, checkpoint_every=2, checkpoint_dir=str(checkpoints_of(tmp_path / "sae")),
                     progress=False)  # fmt: skip
    train_from_store(cnn_chain / "h" / "store", cfg, tc, tmp_path / "sae", batch_size=1024)
    code, _, err = run_main(capsys, *args, "--batch-size", "512", "--resume")
    assert_one_line_error(code, err, "batch_size=1024", "batch_size=512")
    assert code == 2 and not (tmp_path / "sae").exists()
