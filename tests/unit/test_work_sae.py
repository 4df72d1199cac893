"""The passes the sparse-dictionary commands record in their JSON's ``work`` (both wings), against counts known by
construction: a harvest is one pass over its images or tokens (a fraction of one where the forward stops at the
hook; only the images it ran where it resumes, checked in test_sae_cnn's resume test), an evaluation three (clean,
spliced, zero-ablated) and the dictionary two, the dashboards one plus the stimuli and the feature visualisation's
steps, and training the loop's own rows (steps x batch), the whole job's over two processes as over one."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mechscope.cnn.pipelines import sae as CS
from mechscope.core.torch_utils import torch_threads
from mechscope.lm.pipelines import sae as LS
from tests.gloo import as_torchrun, done, free_port, spawn
from tests.unit.test_sae_cnn import dataset, tiny_cnn
from tests.unit.test_sae_lm import harvest_inputs

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread

POSITIONS = 16  # conv2.hook_out of the tiny CNN: 6 channels x 4 x 4 positions
PROBE_IMAGES = 1  # S.hook_shape runs the CNN on one zero image
PROBE_TOKENS = 2  # S.hook_widths runs the transformer on two tokens (BOS and one)


def _json(path) -> dict:
    return json.loads(path.read_text())["work"]


# ---- cnn ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_chain(tmp_path_factory):
    """cnn sae harvest (96 training images), train (3 epochs) and evaluate (64 test images) on a tiny CNN."""
    tmp = tmp_path_factory.mktemp("cnn-work")
    model = tiny_cnn(4)
    data = dataset(model)
    with torch_threads(1):
        out, h = CS.sae_harvest_model(model, data, tmp / "h", shard_rows=256, batch=32, progress=False)
        _, t = CS.sae_train_run(out, tmp / "sae", d_sae=24, k=3, batch_size=128, epochs=3, progress=False)
    return tmp, model, data, h, t


def test_cnn_harvest_is_one_pass_over_its_images(cnn_chain):
    tmp, _, _, h, _ = cnn_chain
    w = _json(tmp / "h" / "harvest.json")
    assert w == h.work
    # every image once through both stages, and the hook's shape probed twice (the pipeline, the batches)
    assert w["unit"] == "images" and w["rows_per_pass"] == h.images == 96
    assert w["forward_images"] == 96 + 2 * PROBE_IMAGES
    assert w["forward_passes"] == round(98 / 96, 3) and w["backward_passes"] == 0.0


def test_cnn_train_counts_the_loops_rows(cnn_chain):
    tmp, _, _, h, t = cnn_chain
    w = _json(tmp / "sae" / "training.json")
    assert w == t.work
    # the network does not run; the dictionary: one forward and one backward of every batch the loop trained on
    assert w["unit"] == "rows" and w["rows_per_pass"] == h.rows == 96 * POSITIONS
    assert w["forward_rows"] == w["backward_rows"] == t.rows == t.steps * 128
    assert w["forward_passes"] == w["backward_passes"] == 3.0  # three epochs, 1536 rows = 12 full batches each
    assert w["layer_calls"] == {"forward": t.steps, "backward": t.steps}


def test_cnn_evaluate_is_three_passes_and_the_dictionary_two(cnn_chain, caplog):
    tmp, model, data, _, _ = cnn_chain
    with caplog.at_level(logging.INFO, logger="mechscope.core.torch_utils"):
        _, e = CS.sae_evaluate_model(model, data, tmp / "sae", tmp / "ev", progress=False)
    w = _json(tmp / "ev" / "evaluation.json")
    assert w == e.work
    n = e.effect.images
    assert w["unit"] == "images" and w["rows_per_pass"] == n == 64
    assert w["forward_images"] == 3 * n + PROBE_IMAGES  # clean, spliced, zero-ablated
    assert w["forward_passes"] == round((3 * n + 1) / n, 3) and w["backward_passes"] == 0.0
    d = w["dictionary"]
    assert d["unit"] == "rows" and d["rows_per_pass"] == n * POSITIONS == e.metrics["tokens"]
    assert d["forward_rows"] == 2 * n * POSITIONS and d["forward_passes"] == 2.0  # spliced in, and the metrics
    assert f"cnn sae evaluate: {w['forward_passes']} forward and 0.0 backward passes of 64 images" in caplog.messages


def test_cnn_show_is_one_pass_plus_stimuli_and_featvis(cnn_chain):
    from mechscope.cnn.methods.stimuli import draw_stimuli

    tmp, model, data, _, _ = cnn_chain
    kw = dict(n_selective=2, n_random=1, progress=False)
    _, plain = CS.sae_show_model(model, data, tmp / "sae", tmp / "d0", tuning=False, featvis_steps=0, **kw)
    w = _json(tmp / "d0" / "dashboards.json")
    assert w == plain.work
    assert w["unit"] == "images" and w["rows_per_pass"] == plain.images == 64
    assert w["forward_images"] == 64 + PROBE_IMAGES and w["backward_images"] == 0
    # stroke tuning: the stimuli and a blank image, for the channels, the latents and the random control
    _, tuned = CS.sae_show_model(model, data, tmp / "sae", tmp / "d1", tuning=True, featvis_steps=0, **kw)
    stimuli = len(draw_stimuli((28, 28), 0).stimuli)
    assert tuned.work["forward_images"] == 64 + PROBE_IMAGES + 3 * (stimuli + 1)
    # feature visualisation: each step one forward and one backward of a batch of one image per dashboard (the
    # gradient reaches both stages: the hook is the last one's output), and a last forward of the images
    _, vis = CS.sae_show_model(model, data, tmp / "sae", tmp / "d2", tuning=False, featvis_steps=4, **kw)
    boards = len(vis.latents)
    assert vis.work["forward_images"] == 64 + PROBE_IMAGES + (4 + 1) * boards
    assert vis.work["backward_images"] == 4 * boards


# ---- two processes ----------------------------------------------------------------------------------------


def _worker(rank: int, world: int, port: int, model, data, out: str) -> None:
    as_torchrun(rank, world, port)
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        CS.sae_harvest_model(model, data, f"{out}/h", shard_rows=256, batch=32, progress=False, distributed=True)
        CS.sae_train_run(f"{out}/h", f"{out}/sae", d_sae=24, k=3, batch_size=128, epochs=2, progress=False,
                         distributed=True)  # fmt: skip
    finally:
        dist.destroy_process_group()
    done(out, rank)


def test_two_processes_record_the_whole_jobs_work(tmp_path):
    """Harvest and training on two gloo processes (torchrun's environment): rank 0's JSON holds both processes'
    passes, the one-process counts (each process probes the hook's shape itself)."""
    model = tiny_cnn(4)
    data = dataset(model)
    CS.sae_harvest_model(model, data, tmp_path / "one" / "h", shard_rows=256, batch=32, progress=False)
    CS.sae_train_run(tmp_path / "one" / "h", tmp_path / "one" / "sae", d_sae=24, k=3, batch_size=128, epochs=2,
                     progress=False)  # fmt: skip
    (tmp_path / "two").mkdir()
    spawn(_worker, (2, free_port(), model, data, str(tmp_path / "two")), tmp_path / "two")
    one, two = _json(tmp_path / "one" / "h" / "harvest.json"), _json(tmp_path / "two" / "h" / "harvest.json")
    assert json.loads((tmp_path / "two" / "h" / "harvest.json").read_text())["world_size"] == 2
    assert one["forward_images"] == 96 + 2 * PROBE_IMAGES
    assert two["forward_images"] == 96 + 2 * 2 * PROBE_IMAGES and two["rows_per_pass"] == 96
    one, two = _json(tmp_path / "one" / "sae" / "training.json"), _json(tmp_path / "two" / "sae" / "training.json")
    steps = json.loads((tmp_path / "two" / "sae" / "training.json").read_text())["steps"]
    assert two["forward_rows"] == two["backward_rows"] == one["forward_rows"] == steps * 128
    assert two["forward_passes"] == one["forward_passes"] == 2.0
    assert two["layer_calls"] == {"forward": 2 * steps, "backward": 2 * steps}  # each process, every step


# ---- core training: the resampling's forwards -------------------------------------------------------------------


def test_relu_resampling_adds_a_forward_of_the_batch(monkeypatch):
    import importlib

    from mechscope.core.dictionaries import DictionaryConfig, TrainConfig, train
    from mechscope.core.torch_utils import WorkCounter

    T = importlib.import_module("mechscope.core.dictionaries.train")  # the module (the package exports the function)

    resampled = []
    original = T.resample_dead

    def spy(*a, **k):
        n = original(*a, **k)
        resampled.append(n)
        return n

    monkeypatch.setattr(T, "resample_dead", spy)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 4, generator=g) for _ in range(8)]
    counter = WorkCounter([], "rows")
    cfg = DictionaryConfig(d_in=4, d_sae=64, architecture="relu", l1_coefficient=100.0)  # a strong L1 kills latents
    r = train(cfg, batches, TrainConfig(lr=0.1, resample_every=2, dead_window=32, init_rows=64, progress=False),
              counter=counter)  # fmt: skip
    forwards = sum(1 for n in resampled if n)
    assert len(resampled) == 4 and forwards > 0  # some latents were dead and were resampled
    assert counter.backward_rows == r.rows == 8 * 32
    assert counter.forward_rows == r.rows + forwards * 32


# ---- lm -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_chain(tmp_path_factory):
    """lm sae harvest (an SAE's hook and a transcoder pair, on the last block) and train on a tiny transformer."""
    tmp = tmp_path_factory.mktemp("lm-work")
    tm, text, settings = harvest_inputs(tmp)
    with torch_threads(1):
        out, h = LS.sae_harvest("tiny", tmp / "h", text, settings, model=tm, progress=False)
        _, t = LS.sae_train(out / "blocks.1.hook_resid_post", tmp / "sae", d_sae=32, k=4, batch_size=128, epochs=2,
                            progress=False)  # fmt: skip
    return tmp, tm, text, h, t


def test_lm_harvest_is_one_pass_over_its_tokens(lm_chain, tmp_path):
    tmp, tm, text, h, _ = lm_chain
    w = _json(tmp / "h" / "harvest.json")
    assert w == h.work
    n = h.contexts * h.context
    assert w["unit"] == "tokens" and w["rows_per_pass"] == h.tokens == n
    assert w["forward_tokens"] == n + 2 * PROBE_TOKENS  # the hooks are in the last block: whole passes
    # a hook in block 0 of 2: the forward stops there, half a pass (the probes run whole)
    settings = LS.HarvestSettings(hooks=("blocks.0.hook_resid_post",), context=24, shard_rows=256, batch=8)
    _, h0 = LS.sae_harvest("tiny", tmp_path / "h0", text, settings, model=tm, progress=False)
    assert h0.work["forward_tokens"] == (n * 1 + 2 * PROBE_TOKENS * 2) // 2
    assert h0.work["forward_passes"] == round((n + 8) / 2 / n, 3)


def test_lm_train_counts_the_loops_rows(lm_chain):
    tmp, _, _, h, t = lm_chain
    w = _json(tmp / "sae" / "training.json")
    assert w == t.work
    assert w["unit"] == "rows" and w["rows_per_pass"] == h.rows == h.contexts * 23
    assert w["forward_rows"] == w["backward_rows"] == t.rows == t.steps * 128
    assert w["forward_passes"] == round(t.steps * 128 / h.rows, 3)


def test_lm_evaluate_is_three_passes_and_the_dictionary_two(lm_chain):
    tmp, tm, text, _, _ = lm_chain
    _, e = LS.sae_evaluate("tiny", tmp / "sae", None, text, LS.ReadSettings(context=24, contexts=8), model=tm,
                           progress=False)  # fmt: skip
    w = _json(tmp / "sae" / "evaluation" / "evaluation.json")
    assert w == e.work
    n = e.effect.tokens
    assert w["unit"] == "tokens" and w["rows_per_pass"] == n == 8 * 24
    assert w["forward_tokens"] == 3 * n + PROBE_TOKENS  # clean, spliced, zero-ablated
    d = w["dictionary"]
    assert d["rows_per_pass"] == 8 * 23 == e.metrics["tokens"]  # the positions after the BOS
    assert d["forward_rows"] == 2 * 8 * 23 and d["forward_passes"] == 2.0


def test_lm_show_is_one_pass_plus_the_induction_sequences(lm_chain):
    tmp, tm, text, _, _ = lm_chain
    _, r = LS.sae_show("tiny", tmp / "sae", tmp / "dash", text, LS.ReadSettings(context=24, contexts=20), model=tm,
                       n_random=2, n_induction=1, progress=False)  # fmt: skip
    w = _json(tmp / "dash" / "dashboards.json")
    assert w == r.work
    n = r.contexts * r.context
    assert w["unit"] == "tokens" and w["rows_per_pass"] == n == 20 * 24
    induction = r.induction.sequences * (1 + 2 * r.induction.n)  # BOS + n random tokens + the same n again
    assert w["forward_tokens"] == n + induction + PROBE_TOKENS and w["backward_tokens"] == 0
