"""The small CLIP's training against outside truths: CLIP's loss from the paper written in numpy, the
warmup/cosine schedule and Adam settings of the paper, each setting at its bounds, and transformers' ``CLIPModel``
reading the saved checkpoint (the sampler and the pipelines: test_clip_data_pipelines_truths)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError
from tests.unit.test_clip_methods_truths import fake_mnist

pytestmark = pytest.mark.usefixtures("one_thread")


def np_log_softmax(a: np.ndarray, axis: int) -> np.ndarray:
    m = a.max(axis, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(axis, keepdims=True))


def merged_loss_by_loops(logits: np.ndarray, caption: list[int]) -> float:
    """CLIP's symmetric loss with repeated captions merged, a plain loop: image → text cross-entropy per row; per
    caption with images, cross-entropy over the images against a uniform target on the images holding it."""
    rows = np_log_softmax(logits, 1)
    cols = np_log_softmax(logits, 0)
    i2t = -np.mean([rows[i, c] for i, c in enumerate(caption)])
    t2i = []
    for k in sorted(set(caption)):
        mine = [i for i, c in enumerate(caption) if c == k]
        t2i.append(-sum(cols[i, k] for i in mine) / len(mine))
    return 0.5 * (i2t + float(np.mean(t2i)))


# ---- the loss -------------------------------------------------------------------------------------------------


def test_with_distinct_captions_the_loss_is_the_papers_numpy_pseudocode():
    """Truth: Radford et al. 2021, Figure 3: (CE(logits, labels, axis=0) + CE(logits, labels, axis=1)) / 2, with the
    text columns in a shuffled order (each image's own column given by ``caption``)."""
    from mechscope.clip.training import contrastive_loss

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(5, 5)) * 3
    perm = [3, 0, 4, 1, 2]
    aligned = logits[:, perm]  # column i is image i's text: the paper's labels = arange(n)
    labels = np.arange(5)
    ce_i = -np_log_softmax(aligned, 1)[labels, labels].mean()
    ce_t = -np_log_softmax(aligned, 0)[labels, labels].mean()
    loss, acc = contrastive_loss(torch.tensor(logits), torch.tensor(perm))
    assert loss.item() == pytest.approx((ce_i + ce_t) / 2, abs=1e-9)
    assert acc.item() == pytest.approx(np.mean(logits.argmax(1) == np.array(perm)))


def test_repeated_captions_get_a_uniform_target_and_an_unused_column_no_term():
    """Truth: the module docstring by loops: images sharing a caption split its text → image target evenly; a
    column no image holds has no right answer and adds nothing; accuracy is each image's row argmax."""
    from mechscope.clip.training import contrastive_loss

    logits = np.array([[2.0, 0.5, 1.0], [0.3, 1.7, -1.0], [1.1, 0.2, 0.4], [-0.5, 0.9, 2.5]])
    caption = [0, 1, 0, 0]  # column 2 is no image's caption; image 3's argmax is that column
    loss, acc = contrastive_loss(torch.tensor(logits), torch.tensor(caption))
    assert loss.item() == pytest.approx(merged_loss_by_loops(logits, caption), abs=1e-9)
    assert acc.item() == pytest.approx(0.75)


# ---- settings ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [{"bare": 1.0}, {"bare": 0.0}, {"mix": (1.0, 0.0, 0.0, 0.0)},
                                    {"image_size": 28, "patch_size": 4}, {"warmup": 0}])  # fmt: skip
def test_settings_at_their_bounds_are_accepted(change):
    """Truth: the documented ranges: bare a fraction 0–1 inclusive, mix four non-negative weights, an image of at
    least 28 pixels a multiple of the patch, no warmup allowed."""
    from mechscope.clip.training import SmallSettings

    SmallSettings(**change).validate()


@pytest.mark.parametrize("change", [{"bare": 1.01}, {"bare": -0.01}, {"mix": (0.5, 0.3, 0.2)},
                                    {"mix": (1.0, -0.1, 0.0, 0.0)}, {"mix": (float("nan"), 1.0, 1.0, 1.0)},
                                    {"mix": (math.inf, 1.0, 1.0, 1.0)}, {"image_size": 24, "patch_size": 4},
                                    {"image_size": 32, "patch_size": 5}])  # fmt: skip
def test_settings_outside_their_bounds_are_refused(change):
    """Truth: the same ranges; a NaN or infinite weight is no weight (NaN compares false with 0, so it passed the
    sign check and failed later inside numpy's choice)."""
    from mechscope.clip.training import SmallSettings

    with pytest.raises(MechscopeError):
        SmallSettings(**change).validate()


# ---- one tiny training run, recorded -------------------------------------------------------------------------

SETTINGS = dict(steps=8, batch=6, lr=0.01, warmup=3, seed=2, image_size=28, patch_size=7, d_model=24, n_layers=1,
                n_heads=2, d_mlp=40, text_d_model=16, text_layers=2, embed_dim=12, train_limit=100)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train the tiny settings with the sampler, the model and AdamW recorded; the logit scale starts above 100."""
    from mechscope.clip import training

    seen = {"scales": [], "sampler": None, "batches": [], "texts": [], "logits": [], "lrs": [], "groups": None}
    mp = pytest.MonkeyPatch()

    class Sampler(training.PairSampler):
        def __init__(self, images, labels, *a, **k):
            seen["sampler"] = (images.clone(), labels.clone(), a, k)
            super().__init__(images, labels, *a, **k)

        def batch(self, n):
            out = super().batch(n)
            seen["batches"].append(out[1].clone())
            return out

    class Model(training.CLIP):
        def init_weights(self, g):
            super().init_weights(g)
            with torch.no_grad():
                self.logit_scale.fill_(6.0)  # exp(6) ≈ 403: the clamp must bring it to 100

        def encode_text(self, tokens):
            seen["texts"].append(tokens.clone())
            return super().encode_text(tokens)

        def similarity(self, a, b):
            seen["scales"].append(self.logit_scale.item())
            out = super().similarity(a, b)
            seen["logits"].append(out.detach().double().numpy().copy())
            return out

    real_adamw = torch.optim.AdamW

    def adamw(groups, **kw):
        opt = real_adamw(groups, **kw)
        seen["groups"] = ([{id(p) for p in g["params"]} for g in opt.param_groups], kw)
        step = opt.step

        def recorded_step(*a, **k):
            seen["lrs"].append([g["lr"] for g in opt.param_groups])
            return step(*a, **k)

        opt.step = recorded_step
        return opt

    mp.setattr(training, "PairSampler", Sampler)
    mp.setattr(training, "CLIP", Model)
    mp.setattr(torch.optim, "AdamW", adamw)
    images, labels = fake_mnist(130, seed=3)
    s = training.SmallSettings(**SETTINGS)
    try:
        trained = training.train(s, images, labels)
    finally:
        mp.undo()
    out = tmp_path_factory.mktemp("small")
    training.save_small(out, trained, s)
    return SimpleNamespace(seen=seen, trained=trained, s=s, images=images, labels=labels, out=out)


def test_training_samples_only_the_first_train_limit_images_in_the_training_fonts(run):
    """Truth: --train-limit 100 of 130 images: the sampler gets images[:100] and labels[:100]; it draws in the
    module's default fonts, TRAIN_FONTS, which share none with HELD_OUT_FONTS."""
    from mechscope.clip.data.digits import HELD_OUT_FONTS, TRAIN_FONTS

    images, labels, _, kw = run.seen["sampler"]
    assert torch.equal(images, run.images[:100]) and torch.equal(labels, run.labels[:100])
    assert kw.get("fonts", TRAIN_FONTS) == TRAIN_FONTS and not set(TRAIN_FONTS) & set(HELD_OUT_FONTS)


def test_each_steps_learning_rate_is_the_warmup_cosine_formula(run):
    """Truth: lr·(t+1)/warmup for t < warmup, then lr·½(1 + cos(π(t − warmup)/(steps − warmup))), at each step,
    in every parameter group; Adam's betas are the paper's (0.9, 0.98)."""
    lr, w, n = SETTINGS["lr"], SETTINGS["warmup"], SETTINGS["steps"]
    want = [lr * (t + 1) / w if t < w else lr * 0.5 * (1 + math.cos(math.pi * (t - w) / (n - w))) for t in range(n)]
    got = run.seen["lrs"]
    assert len(got) == n
    for t in range(n):
        assert got[t] == pytest.approx([want[t], want[t]], abs=1e-15)
    assert run.seen["groups"][1]["betas"] == (0.9, 0.98)


def test_weight_decay_spares_gains_biases_and_the_temperature(run):
    """Truth: the paper: decay on weights, not on gains or biases (nor the learned temperature); every weight
    matrix other than a positional embedding is decayed."""
    decayed, spared = run.seen["groups"][0]
    for name, p in run.trained.model.named_parameters():
        if p.dim() < 2:
            assert id(p) in spared, name
        elif "pos" not in name.lower():
            assert id(p) in decayed, name


def test_the_temperature_is_clamped_at_100(run):
    """Truth: the paper clips the logit scale so logits are never scaled by more than 100: it started at e^6 ≈ 403,
    and the step after the first update (a few thousandths by Adam) reads exactly 100."""
    scales = run.seen["scales"]
    assert scales[0] == 6.0 and math.exp(scales[1]) == pytest.approx(100.0, rel=1e-6)
    assert max(scales[1:]) <= math.log(100) + 1e-6


def test_each_logit_column_is_the_text_of_the_batchs_distinct_captions_in_order(run):
    """Truth: the texts the tower read at a step are the tokenised distinct captions of that batch, sorted by
    caption index; the loss logged at step 0 is the merged loss of those logits by loops."""
    from mechscope.clip.data.digits import all_captions
    from mechscope.clip.models.tokenizer import CHARS, ClipTokenizer, char_ids, char_tokenizer

    ids = char_ids(CHARS)
    tok = ClipTokenizer(char_tokenizer(CHARS), 32, ids["bos"], ids["eos"], ids["eos"])
    caps = all_captions()
    for step in (0, SETTINGS["steps"] - 1):
        cap = run.seen["batches"][step].tolist()
        distinct = sorted(set(cap))
        want, got = tok.batch([caps[c] for c in distinct]), run.seen["texts"][step]  # got: padded to every caption
        assert torch.equal(got[:, : want.shape[1]], want) and (got[:, want.shape[1] :] == ids["eos"]).all()
    cap = run.seen["batches"][0].tolist()
    column = [sorted(set(cap)).index(c) for c in cap]
    want = merged_loss_by_loops(run.seen["logits"][0], column)
    h = run.trained.history
    assert h[0]["step"] == 0 and h[0]["loss"] == pytest.approx(want, abs=2e-5)
    assert h[-1]["step"] == SETTINGS["steps"] - 1  # the last step is logged too


def test_the_saved_checkpoint_gives_transformers_the_same_embeddings(run):
    """Truth: transformers' CLIPModel loading the saved directory (sizes all different, so a swapped field shows):
    its image and text features equal ours."""
    transformers = pytest.importorskip("transformers")
    from mechscope.clip.data.digits import all_captions
    from mechscope.clip.models.tokenizer import CHARS, ClipTokenizer, char_ids, char_tokenizer

    hf = transformers.CLIPModel.from_pretrained(run.out).eval()
    ours = run.trained.model
    pixels = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ids = char_ids(CHARS)
    tokens = ClipTokenizer(char_tokenizer(CHARS), 32, ids["bos"], ids["eos"], ids["eos"]).batch(all_captions()[::7])
    with torch.no_grad():
        hi, ht = hf.get_image_features(pixel_values=pixels), hf.get_text_features(input_ids=tokens)
        hi, ht = getattr(hi, "pooler_output", hi), getattr(ht, "pooler_output", ht)
        assert torch.allclose(hi, ours.encode_image(pixels), atol=1e-5)
        assert torch.allclose(ht, ours.encode_text(tokens), atol=1e-5)
        assert hf.logit_scale.item() == pytest.approx(ours.logit_scale.item())
    text = hf.config.text_config  # CLIP's text transformer (GPT-2's layout): an MLP four times its own width
    assert (text.hidden_size, text.intermediate_size) == (16, 64)


def test_the_saved_records_read_back_with_json(run):
    """Truth: the settings trained with (28 px images) and the module's font lists, read back with ``json``."""
    from mechscope.clip.data.digits import HELD_OUT_FONTS, TRAIN_FONTS

    rec = json.loads((run.out / "mechscope.json").read_text())
    assert rec["train_fonts"] == list(TRAIN_FONTS) and rec["held_out_fonts"] == list(HELD_OUT_FONTS)
    assert rec["settings"] == json.loads(json.dumps(asdict(run.s)))
    pre = json.loads((run.out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"shortest_edge": 28} and pre["crop_size"] == {"height": 28, "width": 28}
