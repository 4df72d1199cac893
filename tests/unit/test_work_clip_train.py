"""The passes ``clip inspect/attack/neurons/train`` and ``cnn train`` record in their JSON's ``work``, against counts
known independently: one pass over the images classified, the algorithm's own batches, the training steps' batches
and the evaluation's images."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread

transformers = pytest.importorskip("transformers")  # the tiny checkpoints are written with transformers


def _both_towers(work, image_rows, text_rows):
    assert set(work) == {"image", "text"}
    assert work["image"]["unit"] == "images" and work["image"]["rows_per_pass"] == image_rows
    assert work["text"]["unit"] == "texts" and work["text"]["rows_per_pass"] == text_rows


def test_work_counters_count_each_tower_and_follow_a_reloaded_copy(tiny_clip):
    from mechscope.clip.models.clip import report_work, work_counters
    from mechscope.clip.models.loading import load_clip
    from mechscope.core.torch_utils import counting

    b = load_clip(tiny_clip, device="cpu", dtype="float32")
    counters = work_counters(b.model)
    pixels = torch.rand(5, *b.model.vision.input_shape)
    with counting(counters), torch.no_grad():
        b.model.encode_image(pixels)  # 5 images through both blocks
        b.text_embeds(["a cat", "a dog", "a photo"])  # 3 texts
        b.model.vision.run_blocks(b.model.vision.embed(pixels[:2]), 1)  # half a pass of 2 images
    again = load_clip(tiny_clip, device="cpu", dtype="float32")
    with counting(work_counters(again.model, counters)), torch.no_grad():
        again.model.encode_image(pixels[:1])  # the same counters, on the reloaded copy
    b.model.encode_image(pixels)  # after the counting: no hooks left
    work = report_work(counters, "test", {"image": 5, "text": 3})
    assert work["image"]["forward_images"] == 5 + 1 + 1 and work["image"]["forward_passes"] == 1.4
    assert work["text"]["forward_passes"] == 1.0 and work["text"]["backward_passes"] == 0.0


def test_inspect_records_one_pass_of_each_tower(tiny_clip, clip_pictures, tmp_path, caplog):
    from mechscope.clip.methods.evaluate import InspectResult
    from mechscope.clip.pipelines.inspect import inspect

    prompts = ["a photo of a cat", "a photo of a dog", "the cat"]
    with caplog.at_level(logging.INFO, logger="mechscope.core.torch_utils"):
        out, r = inspect(tiny_clip, tmp_path / "i", images=clip_pictures, prompts=prompts, device="cpu")
    _both_towers(r.work, 8, 3)
    assert r.work["image"]["forward_passes"] == 1.0 and r.work["image"]["backward_passes"] == 0.0
    assert r.work["text"]["forward_passes"] == 1.0 and r.work["text"]["forward_texts"] == 3
    assert json.loads((out / InspectResult.FILE).read_text())["work"] == r.work
    assert InspectResult.load(out).work == r.work
    assert "clip inspect (image tower): 1.0 forward and 0.0 backward passes of 8 images" in caplog.messages
    assert "clip inspect (text tower): 1.0 forward and 0.0 backward passes of 3 texts" in caplog.messages
    _, bare = inspect(tiny_clip, tmp_path / "bare", device="cpu")  # no images: the model does not run
    assert bare.work is None


def test_attack_counts_the_algorithms_own_batches(tiny_clip, clip_pictures, tmp_path):
    from mechscope.clip.methods.attack import AttackResult
    from mechscope.clip.pipelines.attack import AttackSettings, attack
    from mechscope.clip.pipelines.inspect import inspect

    prompts = ["a photo of cat", "a photo of dog"]
    _, i = inspect(tiny_clip, tmp_path / "i", images=clip_pictures, prompts=prompts, device="cpu")
    true, other = ("cat", "dog") if (np.asarray(i.probabilities).argmax(1) == 0).sum() >= 4 else ("dog", "cat")
    s = AttackSettings(word=other, true=true, classes=("cat", "dog"), prompt="a photo of {}", k=2, candidates=4,
                       controls=3, label=True, ablate=((1, 5),))  # fmt: skip
    out, r = attack(tiny_clip, tmp_path / "attack", s, images=clip_pictures, device="cpu")
    m = r.finding.summary
    n, d, h = m.n_images, m.n_discovery, m.n_heldout
    cands = r.finding.neurons
    candidate_layers = len({c.layer for c in cands})
    # clean and attacked logits, the token means (mean ablation), attribution patching on the discovery half (forward
    # and back), the exact effects (base logits, one probe image in exact_effects and one in intervene per layer, the
    # discovery half once per candidate), the top k ablated (every attacked image, the clean held-out half), the given
    # neurons ablated (attacked and clean held-out halves), and each control on the attacked held-out half
    forward = 3 * n + d + d + 2 * candidate_layers + d * len(cands) + n + h + 2 * h + s.controls * h
    _both_towers(r.work, n, 2)
    assert r.work["image"]["forward_images"] == forward
    assert r.work["image"]["backward_images"] == d  # one backward pass, attribution patching's
    assert r.work["image"]["forward_passes"] == round(forward / n, 3)
    assert r.work["text"]["forward_passes"] == 1.0 and r.work["text"]["backward_passes"] == 0.0  # the two prompts
    assert AttackResult.load(out).work == r.work


def test_neurons_counts_the_concepts_the_dataset_and_the_readings(tiny_clip, clip_pictures, tmp_path):
    import mechscope.clip as C
    from mechscope.clip.methods.neurons import NeuronsResult
    from mechscope.clip.pipelines.neurons import NeuronSettings, neurons

    concepts = tmp_path / "concepts"
    for i, name in enumerate(("cat", "dog")):
        (concepts / name).mkdir(parents=True)
        for j in range(3):
            src = clip_pictures / f"img{4 * i + j}.png"
            (concepts / name / src.name).write_bytes(src.read_bytes())
    b = C.load(tiny_clip, device="cpu", dtype="float32")
    # nothing read in full: the concepts' pictures and drawn names, then the dataset, each forward once
    r = C.neurons(b, images=clip_pictures, concepts=concepts, read=0, controls=10, words=("cat", "dog"))
    mm = r.multimodality
    _both_towers(r.work, 8, 2 * 3)
    assert r.work["image"]["forward_images"] == mm.n_pictures + mm.n_words + r.n_dataset
    assert r.work["image"]["backward_passes"] == 0.0 and r.work["text"]["forward_passes"] == 0.0

    # one neuron of layer 1 (of 2) read in full: the backward passes are the feature visualisations' steps (one image,
    # and 4 diverse ones) and the integrated gradients' 32 steps over its top images, each from the neuron back
    # through block 0 (inside block 1 the counter sees no block's output gradient: half a pass of the two blocks);
    # the text tower embeds every probe word in every template once
    steps, k = 3, 3
    s = NeuronSettings(neurons=((1, 5),), read=1, steps=steps, k=k, controls=10, words=("cat", "dog"), diverse=4)
    out, r = neurons(tiny_clip, tmp_path / "n", s, images=clip_pictures, concepts=concepts, device="cpu")
    assert len(r.readings) == 1 and len(r.readings[0].top_images) == k
    backward = (steps * 1 + steps * 4 + 32 * k) * 1  # images x blocks run backward
    assert r.work["image"]["layer_calls"]["backward"] == steps + steps + 1  # one block: each step's, IG's one chunk
    assert r.work["image"]["backward_images"] == backward // 2
    assert r.work["image"]["backward_passes"] == round(backward / 2 / r.n_dataset, 3)
    assert r.work["text"]["forward_passes"] == 1.0 and r.work["text"]["forward_texts"] == len(r.words) * 3
    assert NeuronsResult.load(out).work == r.work


def test_clip_train_counts_the_steps_and_the_evaluation(mnist_root, tmp_path):
    from mechscope.clip.data.digits import PairSampler, all_captions
    from mechscope.clip.methods.evaluate import TrainResult
    from mechscope.clip.pipelines.train import train_small
    from mechscope.clip.training import SmallSettings
    from mechscope.cnn.data.mnist import load_mnist

    s = SmallSettings(steps=3, batch=16, train_limit=200, warmup=1)
    out, r = train_small(tmp_path / "small", s, data_dir=mnist_root)
    image, text = r.work["image"], r.work["text"]
    _both_towers(r.work, s.batch, len(all_captions()))
    # every step: its batch forward and back; then the evaluation: each image it classifies, forward once
    assert image["backward_images"] == s.steps * s.batch and image["backward_passes"] == s.steps
    assert image["forward_images"] == s.steps * s.batch + sum(a.n for a in r.evaluation)
    # every step: the batch's distinct captions forward and back (the same sampler, replayed); the evaluation: four
    # prompt templates over the ten digits, forward once
    m = load_mnist(mnist_root, download_missing=False)
    sampler = PairSampler(m.train_images[: s.train_limit], m.train_labels[: s.train_limit], s.image_size, s.seed + 1,
                          s.mix, bare=s.bare)  # fmt: skip
    distinct = sum(len(torch.unique(sampler.batch(s.batch)[1])) for _ in range(s.steps))
    assert text["backward_texts"] == distinct and text["forward_texts"] == distinct + 4 * 10
    assert json.loads((out / TrainResult.FILE).read_text())["work"] == r.work
    assert TrainResult.load(out).work == r.work


@pytest.mark.parametrize("limit", [256, 300])
def test_cnn_train_counts_epochs_and_the_evaluation(mnist_root, tmp_path, limit):
    from mechscope.cnn.config import TrainConfig
    from mechscope.cnn.pipelines.train import train
    from mechscope.cnn.training import RunMetrics

    cfg = TrainConfig(epochs=2, train_limit=limit, batch_size=64, seed=1)
    out, metrics = train(tmp_path / "run", cfg, data_dir=mnist_root, progress=False)
    work = metrics.work
    assert work["unit"] == "images" and work["rows_per_pass"] == limit
    trained = 2 * (limit // 64) * 64  # the ragged last batch of each epoch is dropped
    assert work["backward_images"] == trained and work["forward_images"] == trained + 10_000  # + the test images
    if limit == 256:  # two epochs forward and back, and the 10,000 test images forward once
        assert work["backward_passes"] == 2.0 and work["forward_passes"] == round(2 + 10_000 / 256, 3)
    assert json.loads((out / "metrics.json").read_text())["work"] == work
    assert RunMetrics.load(out / "metrics.json").work == work
