"""Second truths for the CLIP wing's model, loading, report context, inspect pipeline and image folders: transformers'
own models on configs the tiny checkpoints leave at their defaults, hand-written folders, hand-worked sentences."""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from mechscope.core.errors import DataError, MechscopeError
from tests.e2e.test_clip_cli import _accuracy
from tests.unit.test_clip_models import clip_bpe_vocab

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

TOWER = dict(hidden_size=32, intermediate_size=20, num_hidden_layers=1, num_attention_heads=4)


def _save(model, directory, vocab, merges):
    """A transformers model saved with a CLIP BPE tokenizer and no preprocessor config (the family's defaults)."""
    directory.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for p in model.parameters():  # nothing left at an initial zero or one
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(directory)
    transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges]).save_pretrained(directory)
    return model


def clip_dir(directory, text_eps=1e-3, vision_act="gelu", scale=1.7, proj=12):
    """A CLIP whose towers differ in eps and activation, with projection_dim != hidden and a set logit scale."""
    vocab, merges = clip_bpe_vocab()
    torch.manual_seed(3)
    cfg = transformers.CLIPConfig(
        text_config=dict(**TOWER, vocab_size=len(vocab), max_position_embeddings=10, layer_norm_eps=text_eps,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu"),
        vision_config=dict(**TOWER, image_size=16, patch_size=8, hidden_act=vision_act, layer_norm_eps=1e-5),
        projection_dim=proj, logit_scale_init_value=scale,
    )  # fmt: skip
    return _save(transformers.CLIPModel(cfg), directory, vocab, merges)


def siglip_dir(directory, projection_size=20):
    vocab, merges = clip_bpe_vocab()
    torch.manual_seed(4)
    cfg = transformers.SiglipConfig(
        text_config=dict(**TOWER, vocab_size=len(vocab), max_position_embeddings=8, projection_size=projection_size,
                         pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         bos_token_id=vocab["<|startoftext|>"]),
        vision_config=dict(TOWER, hidden_size=projection_size, image_size=16, patch_size=8),
    )  # fmt: skip
    return _save(transformers.SiglipModel(cfg), directory, vocab, merges)


def _pooled(x):
    return getattr(x, "pooler_output", x)


def _parity(directory, ref):
    """mechscope's image and text embeddings and logits_per_image beside transformers' on the same inputs."""
    from mechscope.clip.models.loading import load_clip

    b = load_clip(directory, device="cpu", dtype="float32")
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    tokens = b.tokenizer.batch(["a photo of the cat", "cat", "the photo"])
    with torch.no_grad():
        out = ref(input_ids=tokens, pixel_values=pixels)
        pairs = [(b.model.encode_image(pixels), _pooled(ref.get_image_features(pixel_values=pixels))),
                 (b.model.encode_text(tokens), _pooled(ref.get_text_features(input_ids=tokens))),
                 (b.model(pixels, tokens), out.logits_per_image)]  # fmt: skip
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=2e-5, rtol=1e-5)
    return b, out


@pytest.fixture(scope="module")
def clip_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip2") / "odd-clip"
    return d, clip_dir(d)


def test_clip_with_gelu_image_tower_distinct_eps_and_small_projection_is_transformers(clip_model):
    """Outside truth: transformers' CLIPModel with vision gelu, text eps 1e-3, projection_dim 12 != hidden 32 and
    logit scale exp(1.7): embeddings and logits_per_image to float precision."""
    b, out = _parity(*clip_model)
    assert b.model.cfg.embed_dim == 12
    assert abs(float(clip_model[1].logit_scale.detach()) - 1.7) < 0.3  # the set value, with the noise _save adds
    assert out.logits_per_image.abs().max() > 0.05  # a test of something


def test_siglip_with_a_projection_size_unlike_its_text_width_is_transformers(tmp_path):
    """Outside truth: transformers' SiglipModel whose text head projects 32 -> 20 (projection_size): the embeddings
    and the sigmoid logits (with the learned bias) to float precision."""
    ref = siglip_dir(tmp_path / "sig")
    b, out = _parity(tmp_path / "sig", ref)
    assert b.model.cfg.text.proj_dim == 20 and b.model.logit_bias is not None
    assert float(ref.logit_bias.detach()) != 0


def test_similarity_is_scaled_cosine_plus_bias_by_numpy():
    """Outside truth: logits = exp(s) · cos(image, text) + b, worked in numpy on hand-picked vectors."""
    from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

    v = VisionConfig(4, 1, 1, 4, 4, 2, proj_dim=3)
    t = TextConfig(4, 1, 1, 4, 5, 3, pooling="last", proj_dim=3)
    m = CLIP(CLIPConfig(v, t, logit_bias=True))
    with torch.no_grad():
        m.logit_scale.fill_(0.5)
        m.logit_bias.fill_(-2.0)
    i, x = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]]), np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 2.0]])
    cos = (i / np.linalg.norm(i, axis=1, keepdims=True)) @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T
    got = m.similarity(torch.tensor(i, dtype=torch.float32), torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(got.detach().numpy(), math.exp(0.5) * cos - 2.0, rtol=1e-6, atol=1e-6)


def test_describe_counts_transformers_parameters_and_mlp_neurons(clip_model):
    """Outside truth: transformers' own parameter count of the same checkpoint; neurons = layers × intermediate."""
    from mechscope.clip.models.clip import describe
    from mechscope.clip.models.loading import load_clip

    directory, ref = clip_model
    d = describe(load_clip(directory, device="cpu", dtype="float32").model)
    assert d["parameters"] == sum(p.numel() for p in ref.parameters())
    assert d["vision_neurons"] == 1 * 20 and d["embed_dim"] == 12
    assert d["text"].startswith("causal transformer: 1 layers, d_model 32") and "gelu, pooling cls" in d["vision"]
    assert "16px 3-channel images in 8px patches (5 positions)" in d["vision"]


def test_config_dict_round_trips_and_names_unknown_fields():
    """Outside truth: a config with every field distinct from its default survives to_dict/from_dict unchanged; an
    unknown field is a one-line MechscopeError naming it (not a TypeError)."""
    from mechscope.clip.models.clip import CLIPConfig, TextConfig, VisionConfig

    v = VisionConfig(8, 2, 2, 6, 12, 4, 1, "gelu", 1e-4, False, False, "map", True, None)
    t = TextConfig(8, 3, 4, 5, 9, 7, "relu", 2e-3, False, "last", 1, 2, 3, 8, True, True)
    cfg = CLIPConfig(v, t, family="siglip", logit_bias=True, name="x")
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict()
    bad["text"]["colour"] = 1
    with pytest.raises(MechscopeError, match="unknown TextConfig fields: colour"):
        CLIPConfig.from_dict(bad)


def test_a_patch_as_large_as_the_image_is_one_patch_and_grey_is_allowed():
    """Outside truth: ViT arithmetic, one 8px patch of an 8px image plus the class token is 2 positions; transformers
    accepts num_channels 1 and patch_size == image_size."""
    from mechscope.clip.models.clip import VisionConfig

    v = VisionConfig(4, 1, 1, 4, image_size=8, patch_size=8, n_channels=1)
    v.validate()
    assert v.n_positions == 2


def test_a_text_as_long_as_the_context_and_the_last_token_id_are_read():
    """Outside truth: a context of n_ctx tokens holds n_ctx tokens, and ids 0..d_vocab-1 are all tokens; SigLIP's
    last-position pooling reads the final position (hand-built model: the text's pooled state is its embedding)."""
    from mechscope.clip.models.clip import TextConfig, TextTower

    t = TextTower(TextConfig(4, 1, 1, 4, 6, 3, pooling="last", proj_dim=4))
    tokens = torch.tensor([[0, 1, 5]])
    t.check_tokens(tokens)
    assert t.read_position(tokens).tolist() == [2]
    with pytest.raises(MechscopeError):
        t.check_tokens(torch.tensor([[0, 1, 6]]))


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 0), ("layer_norm_eps", 0.0)])
def test_configs_transformers_would_build_into_nan_or_nothing_are_refused(field, value):
    """Outside truth: a zero-layer tower or a zero eps (x / sqrt(0) for a constant row) is not a usable model."""
    from mechscope.clip.models.loading import clip_config

    raw = {"text_config": {field: value}, "vision_config": {}}
    with pytest.raises(MechscopeError, match=field):
        clip_config(raw, "clip")


def test_a_special_token_equal_to_the_vocabulary_size_is_outside_it():
    """Outside truth: a vocabulary of n tokens has ids 0..n-1."""
    from mechscope.clip.models.loading import clip_config

    with pytest.raises(MechscopeError, match="eos_token_id"):
        clip_config({"text_config": {"vocab_size": 50, "eos_token_id": 50}, "vision_config": {}}, "clip")
    cfg = clip_config({"text_config": {"vocab_size": 50, "eos_token_id": 49}, "vision_config": {}}, "clip")
    assert cfg.text.eos_token_id == 49 and cfg.vision.proj_dim == 512


def test_null_fields_take_transformers_defaults():
    """Outside truth: transformers' CLIPTextConfig(hidden_act=None) is invalid; its JSON nulls mean 'the default'."""
    from mechscope.clip.models.loading import clip_config

    cfg = clip_config({"text_config": {"hidden_act": None, "hidden_size": 64, "num_attention_heads": 4},
                       "vision_config": {"hidden_act": None}}, "clip")  # fmt: skip
    assert cfg.text.act == cfg.vision.act == "quick_gelu" and cfg.text.d_model == 64


def _png(path, value, size=(6, 5)):
    from PIL import Image

    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path, format="PNG")


def test_a_folder_reads_its_images_in_name_order_skipping_hidden_files_and_subfolders(tmp_path):
    """Outside truth: a folder written by hand with PIL: b.png (value 200), a.png (value 40), a hidden .c.png, a
    sub-folder; the images come back a then b, each its own grey level."""
    from mechscope.clip.data.folder import read_folder

    _png(tmp_path / "b.png", 200)
    _png(tmp_path / "a.png", 40)
    _png(tmp_path / ".c.png", 90)
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "d.png", 120)
    pre = NS(to_unit=lambda ims: torch.tensor(np.stack([np.asarray(im, np.float32) / 255 for im in ims])))
    unit, names = read_folder(tmp_path, pre)
    assert names == ["a.png", "b.png"]
    np.testing.assert_allclose(unit[:, 0, 0, 0].numpy(), [40 / 255, 200 / 255], rtol=1e-6)


def test_concepts_need_two_visible_folders_and_an_empty_one_is_refused(tmp_path):
    """Outside truth: hand-made class folders: 'dog' and a hidden '.cache' are one concept (refused); adding an
    empty 'cat' makes two, and its emptiness is a one-line DataError naming it; a text file is refused by name."""
    from mechscope.clip.data.folder import read_concepts

    pre = NS(to_unit=lambda ims: torch.zeros(len(ims), 3, 2, 2))
    (tmp_path / "dog").mkdir()
    _png(tmp_path / "dog" / "1.png", 10)
    (tmp_path / ".cache").mkdir()
    _png(tmp_path / ".cache" / "x.png", 10)
    with pytest.raises(DataError, match="found 1"):
        read_concepts(tmp_path, pre)
    (tmp_path / "cat").mkdir()
    with pytest.raises(DataError, match="cat: no image files"):
        read_concepts(tmp_path, pre)
    (tmp_path / "cat" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match="notes.txt: not an image"):
        read_concepts(tmp_path, pre)
    _png(tmp_path / "cat" / "notes.txt", 5)  # now a PNG under any name
    assert sorted(read_concepts(tmp_path, pre)) == ["cat", "dog"]


def test_versus_chance_and_the_cross_verdict_at_their_boundaries():
    """Outside truth: hand arithmetic. 10 classes, n=100: guess sd √(0.1·0.9/100) = 0.03; 16% is exactly two sds
    above (near chance, ≤); 40% is 10.0 sds; 30% across modalities is not above 0.3 ('only weakly')."""
    from mechscope.clip.report.context import cross_verdict, near_chance, versus_chance

    assert near_chance(_accuracy("numerals", 16, 100))
    assert not near_chance(_accuracy("numerals", 17, 100))
    assert versus_chance(_accuracy("numerals", 40, 100)) == "10.0 standard errors above chance"
    assert versus_chance(_accuracy("numerals", 0, 100)) == "3.3 standard errors below chance"
    assert cross_verdict(_accuracy("x", 30, 100)).startswith("pictures and written names of a digit meet only")
    assert cross_verdict(_accuracy("x", 31, 100)).startswith("pictures and written names of a digit meet in the")


def _inspect():
    """A stub bundle: a hand-built CLIP and a tokenizer record with distinct fields."""
    from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

    v = VisionConfig(4, 1, 1, 4, 4, 2, proj_dim=4)
    t = TextConfig(4, 1, 1, 4, 5, 3, pooling="last", proj_dim=4, pad_to_context=True)
    model = CLIP(CLIPConfig(v, t, logit_bias=False))
    tok = NS(vocab_size=5, n_ctx=3, bos_id=None, eos_id=4, pad_id=0, pad_to_context=True)
    return NS(model=model, tokenizer=tok, name="stub", preprocess=NS(to_dict=lambda: {}))


def test_inspect_records_the_tokenizer_by_field():
    """Outside truth: the stub tokenizer's own distinct fields (start none, end 4, pad 0, padded to the context)."""
    from mechscope.clip.pipelines.inspect import inspect_bundle

    r = inspect_bundle(_inspect())
    assert r.tokenizer == {"vocabulary": 5, "context": 3, "start id": None, "end id": 4, "pad id": 0,
                           "padding": "to the context"}  # fmt: skip
    assert r.architecture["vision_neurons"] == 4 and r.probabilities == ()


def test_siglip_inspect_gives_each_pair_its_own_sigmoid_of_transformers_logits(tmp_path):
    """Outside truth: transformers' SiglipModel logits_per_image on the same preprocessed pixels and token ids,
    through a sigmoid per pair (SigLIP's training loss), not a softmax over the prompts."""
    from mechscope.clip.data.folder import read_folder
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.pipelines.inspect import inspect_bundle
    from tests.unit.test_clip_models import random_pictures

    ref = siglip_dir(tmp_path / "sig")
    (tmp_path / "pics").mkdir()
    pics = random_pictures(tmp_path / "pics", 3)
    b = load_clip(tmp_path / "sig", device="cpu", dtype="float32")
    prompts = ["the cat", "a photo"]
    r = inspect_bundle(b, pics, prompts)
    unit, names = read_folder(pics, b.preprocess)
    with torch.no_grad():
        logits = ref(input_ids=b.tokens(prompts), pixel_values=b.preprocess.normalize(unit)).logits_per_image
    assert r.images == tuple(names) and r.prompts == tuple(prompts)
    np.testing.assert_allclose(np.array(r.probabilities), torch.sigmoid(logits).numpy(), atol=1e-5)
    assert r.tokenizer["padding"] == "to the context"
    # one pass of each tower: the 3 images, the 2 prompts
    assert (r.work["image"]["rows_per_pass"], r.work["text"]["rows_per_pass"]) == (3, 2)
    assert r.work["image"]["forward_passes"] == r.work["text"]["forward_passes"] == 1.0


def test_a_siglip_saved_with_transformers_default_start_id_loads(tmp_path):
    """Outside truth: transformers.SiglipModel.from_pretrained loads this checkpoint (a warning only) and SigLIP's
    text tower never uses bos_token_id (bidirectional, read at its last position)."""
    vocab, merges = clip_bpe_vocab()
    torch.manual_seed(6)
    cfg = transformers.SiglipConfig(
        text_config=dict(**TOWER, vocab_size=len(vocab), max_position_embeddings=8, projection_size=32,
                         pad_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(TOWER, image_size=16, patch_size=8),
    )  # fmt: skip
    ref = _save(transformers.SiglipModel(cfg), tmp_path / "sig", vocab, merges)
    assert transformers.SiglipModel.from_pretrained(tmp_path / "sig").config.text_config.bos_token_id == 49406
    _parity(tmp_path / "sig", ref)


def test_the_reduce_words_say_which_reduction():
    """Outside truth: the meaning of each reduction of an image's token activations."""
    from mechscope.clip.report.context import reduce_words

    assert reduce_words("mean") == "the mean of its activation over the image's tokens"
    assert reduce_words("max") == "its largest activation over the image's tokens"
    assert reduce_words("cls") == "its activation at the class token"


def test_feature_visualisation_warnings_at_exactly_a_tenth_and_numbered_from_one():
    """Outside truth: 'under a tenth' is strict: 0.2 of a largest 2.0 is a tenth, not under; diverse images are
    counted from 1 as the page shows them."""
    from mechscope.clip.report.context import diverse_note, featvis_clause

    assert featvis_clause(NS(dataset_max=2.0, featvis_response=0.2)) == ""
    assert "reaches 0.190 against the dataset's largest response 2.000" in featvis_clause(
        NS(dataset_max=2.0, featvis_response=0.19)
    )
    note = diverse_note(NS(dataset_max=2.0, diverse_responses=(1.5, 0.2, 0.05)))
    assert note.startswith("Diverse 3 (0.05) reaches under a tenth")


def test_how_many_words_and_images_the_sentences_name():
    """Outside truth: 12 bars drawn of 12 words are all of them; one image is 'its top dataset image'."""
    from mechscope.clip.report.context import top_set, words_shown

    assert words_shown(["w"] * 12) == "all 12 words" and words_shown(["w"] * 13) == "the 12 highest of 13 words"
    assert top_set(NS(top_images=[0, 1])) == "its 2 top dataset images"
    assert top_set(NS(top_images=[0])) == "its top dataset image"


def test_the_control_line_counts_ties_as_not_above():
    """Outside truth: six control sets (0.4375, 0.5, 0.5625, 0.6875, 0.75, 0.8333) against 0.5: four lie strictly
    above it (0.5 itself does not); an undone share of exactly 0 did not widen the shift."""
    from mechscope.clip.report.context import control_line
    from tests.unit.test_clip_render import _attack_result

    line = control_line(_attack_result(heldout_success=0.5, heldout_success_ablated=0.5, control_undone_mean=0.0))
    assert "(above it in 4 of the 6 sets)" in line and "widened" not in line
    assert "The top 5 ablated (50.0%) are below 4 of the 6 sets (their lowest 43.8%)." in line


def test_one_control_set_has_no_sd_in_the_short_form():
    """Outside truth: the sd of a single value is undefined."""
    from mechscope.clip.report.context import control_words
    from tests.unit.test_clip_render import _attack_result

    r = _attack_result(control_successes=(0.25,), control_success_mean=0.25)
    assert control_words(r) == "1 random set of 5 neurons: mean success 25.0%"


def test_clip_train_records_its_seconds_and_work_in_passes_of_one_step(monkeypatch, tmp_path):
    """Outside truth: the stub training's own 1.23456 s (to 2 places: 1.23) and the documented pass sizes: one
    training step's 7 images, every caption once (all_captions())."""
    from mechscope.clip.data.digits import all_captions
    from mechscope.clip.models.clip import CLIP
    from mechscope.clip.pipelines.train import train_small
    from mechscope.clip.training import SmallSettings, Trained
    from tests.unit.test_clip_data_pipelines_truths import fake_mnist_split

    s = SmallSettings(d_model=16, n_heads=2, d_mlp=24, text_d_model=16, embed_dim=8, n_layers=1, text_layers=1, batch=7)
    monkeypatch.setattr("mechscope.cnn.data.mnist.load_mnist", lambda d, **k: fake_mnist_split())
    trained = Trained(CLIP(s.model_config()).eval(), seconds=1.23456)
    monkeypatch.setattr("mechscope.clip.pipelines.train.train", lambda *a, **k: trained)
    monkeypatch.setattr("mechscope.clip.pipelines.train.evaluate_small", lambda b, **k: (_accuracy("x", 5, 20),))
    _, r = train_small(tmp_path / "out", s)
    assert r.train_seconds == 1.23
    assert (r.work["image"]["rows_per_pass"], r.work["text"]["rows_per_pass"]) == (7, len(all_captions()))
    assert len(all_captions()) != 7
