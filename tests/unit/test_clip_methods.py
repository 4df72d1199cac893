"""The small model's loss and tokenizer, feature visualisation of a ViT neuron, and the patch a neuron fires in."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def test_contrastive_loss_is_clips_when_every_caption_is_distinct():
    from mechscope.clip.training import contrastive_loss

    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 3
    ours, _ = contrastive_loss(logits, torch.arange(6))
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    assert ours.item() == pytest.approx(clip.item(), abs=1e-6)


def test_contrastive_loss_merges_repeated_captions():
    from mechscope.clip.training import contrastive_loss

    # two images share caption 0: each is a right answer for it, half the target each
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    loss, acc = contrastive_loss(logits, torch.tensor([0, 0, 1]))
    i2t = F.cross_entropy(logits, torch.tensor([0, 0, 1]))
    t2i = 0.5 * (-(0.5 * F.log_softmax(logits[:, 0], 0)[:2]).sum() - F.log_softmax(logits[:, 1], 0)[2])
    assert loss.item() == pytest.approx(0.5 * (i2t + 2 * t2i / 2).item(), abs=1e-6) and acc.item() == 1.0


def test_char_tokenizer():
    from mechscope.clip.models.tokenizer import CHARS, ClipTokenizer, char_ids, char_tokenizer

    ids = char_ids()
    tok = ClipTokenizer(char_tokenizer(), 32, ids["bos"], ids["eos"], ids["eos"])
    enc = tok.encode("A three")
    assert enc[0] == ids["bos"] and enc[-1] == ids["eos"] and len(enc) == 9
    assert enc[1] == CHARS.index("a") and enc[-2] == CHARS.index("e")  # lower-cased
    with pytest.raises(MechscopeError, match="'A three!' has '!' outside this model's vocabulary"):
        tok.encode("A three!")  # read as the unknown token, as any other character it lacks would be
    batch = tok.batch(["three", "a handwritten three"])
    assert batch.shape == (2, 21) and (batch[0, 7:] == ids["eos"]).all()
    long = tok.encode("x" * 100)
    assert len(long) == 32 and long[-1] == ids["eos"]


def test_feature_visualisation_excites_the_neuron():
    from mechscope.clip.methods.neurons import activations, visualise
    from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
    from mechscope.clip.models.preprocess import Preprocessor
    from mechscope.clip.models.views import ImageModel

    cfg = CLIPConfig(
        VisionConfig(32, 2, 4, 64, 16, 4, n_channels=1, proj_dim=16),
        TextConfig(32, 1, 4, 64, 40, 8, eos_token_id=39, proj_dim=16),
    )
    model = CLIP(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    view = ImageModel(model, Preprocessor(16, 1, mean=(0.5,), std=(0.5,))).eval()
    r = visualise(view, [(1, 3), (0, 7)], steps=60, seed=0)
    assert r.images.shape == (2, 1, 16, 16) and float(r.images.min()) >= 0 and float(r.images.max()) <= 1
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    acts = activations(view, noise, [0, 1])
    assert float(r.final[0]) > float(acts[:, 64 + 3].max())  # beyond every random image
    assert float(r.final[1]) > float(acts[:, 7].max())
    # diverse images of one neuron: the diversity term pushes their layer-0 Gram matrices apart (against the same
    # three starts optimised without it)
    from mechscope.clip.methods.neurons import diversity_objective, layer_name

    d0 = visualise(view, [(1, 3)], steps=60, seed=0, diverse=3)
    assert d0.images.shape == (3, 1, 16, 16)
    from mechscope.core.hooks import run_with_cache

    def gram_similarity(images):  # minus the diversity term: the mean off-diagonal Gram cosine similarity
        _, cache = run_with_cache(view, images, names=[layer_name(0)])
        return -float(diversity_objective(0, 3, weight=1.0)(cache)[0])

    plain = visualise(view, [(1, 3)] * 3, steps=60, seed=0)  # the same three starts without the diversity term
    assert gram_similarity(d0.images) < gram_similarity(plain.images)


def test_hot_patch_and_reduce():
    from mechscope.clip.methods.neurons import check_reduce, hot_patch
    from mechscope.clip.models.views import ImageModel
    from tests.unit.test_clip_planted import images_with_ink, planted_bundle

    b = planted_bundle()
    view = ImageModel(b.model, b.preprocess)
    assert hot_patch(view, images_with_ink("BR", 3, 0, low=0.5), 0, 0) == [(4, 4, 8, 8)] * 3
    assert hot_patch(view, images_with_ink("TL", 2, 0, low=0.5), 0, 1) == [(0, 0, 4, 4)] * 2
    with pytest.raises(MechscopeError):
        check_reduce(view, "median")


def test_prompts_are_checked():
    from mechscope.clip.methods.evaluate import check_prompts

    for bad in ([], [""], ["a", " "], ["only one"], ["a", "a"]):
        with pytest.raises(MechscopeError):
            check_prompts(bad)
    assert check_prompts(["a", "b"]) == ["a", "b"]
