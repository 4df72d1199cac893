"""The image–text models against outside truths: transformers' CLIPModel / SiglipModel / CLIPTokenizer and image
processors built offline on tiny random configs, CLIP's BPE written again here from OpenAI's algorithm, and numpy
arithmetic for the preprocessing and the initialisation's formula."""

from __future__ import annotations

import json
import math
import unicodedata

import numpy as np
import pytest
import torch

from tests.unit.test_clip_models import clip_bpe_vocab, tiny_checkpoint, tiny_clip  # noqa: F401 (fixture)
from tests.unit.test_data_truths import openai_bpe  # the merge loop of OpenAI's bpe(), the same in CLIP's

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread

TOWER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)


def _features(out):
    return getattr(out, "pooler_output", out)


def _save_tokenizer(directory):
    vocab, merges = clip_bpe_vocab()
    tok = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
    tok.save_pretrained(directory)
    return tok


def _old_clip(directory):
    """A CLIP whose text config says bos 0, eos 2, pad 1 (as openai/clip-vit-base-patch32's does): transformers
    reads its embedding at the highest token id (the real end-of-text token)."""
    vocab, _ = clip_bpe_vocab()
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3)
    cfg = transformers.CLIPConfig(
        text_config=dict(**TOWER, vocab_size=len(vocab), max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1),
        vision_config=dict(**TOWER, image_size=30, patch_size=6), projection_dim=24,
    )  # fmt: skip
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(directory)
    return model, _save_tokenizer(directory)


@pytest.fixture(scope="module")
def old_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("old") / "old-clip"
    return (d, *_old_clip(d))


TEXTS = ["a photo of a cat", "the cat", "photo"]


def test_old_config_model_reads_the_highest_token_as_transformers(old_clip):
    """Truth: transformers' CLIPModel.get_text_features on an eos_token_id == 2 config (it pools at argmax of the
    ids), fed the ids transformers' own tokenizer gives (padding with the end token)."""
    from mechscope.clip.models.loading import load_clip

    directory, ref, tok = old_clip
    b = load_clip(directory, device="cpu", dtype="float32")
    ids = tok(TEXTS, padding=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = _features(ref.get_text_features(input_ids=ids))
        ours = b.model.encode_text(ids)
    assert (ours - expected).abs().max().item() < 1e-5
    assert expected.std() > 0.01


def test_old_config_texts_embed_as_transformers(old_clip):
    """Truth: transformers' CLIPTokenizer + CLIPModel.get_text_features on the same old-config checkpoint."""
    from mechscope.clip.models.loading import load_clip

    directory, ref, tok = old_clip
    b = load_clip(directory, device="cpu", dtype="float32")
    with torch.no_grad():
        expected = _features(ref.get_text_features(**tok(TEXTS, padding=True, return_tensors="pt")))
    assert (b.text_embeds(TEXTS) - expected).abs().max().item() < 1e-5


def test_siglip_texts_are_padded_to_the_context_as_transformers(tmp_path):
    """Truth: transformers' tokenizer with padding="max_length" (how SigLIP was trained and how its processor
    pads) and SiglipModel.get_text_features on those ids; the text tower is narrower than its projection
    (projection_size 32, hidden 24), as transformers' SiglipTextConfig allows."""
    from mechscope.clip.models.loading import load_clip

    vocab, _ = clip_bpe_vocab()
    torch.manual_seed(5)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    text = dict(hidden_size=24, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_size=32,
                vocab_size=len(vocab), max_position_embeddings=12, pad_token_id=eos, eos_token_id=eos,
                bos_token_id=bos)  # fmt: skip
    ref = transformers.SiglipModel(
        transformers.SiglipConfig(text_config=text, vision_config=dict(**TOWER, image_size=30, patch_size=6))
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path)
    tok = _save_tokenizer(tmp_path)
    b = load_clip(tmp_path, device="cpu", dtype="float32")
    hf_ids = tok(TEXTS, padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert torch.equal(b.tokenizer.batch(TEXTS), hf_ids)
    with torch.no_grad():
        expected = _features(ref.get_text_features(input_ids=hf_ids))
    ours = b.text_embeds(TEXTS)
    assert ours.shape == (3, 32)
    assert (ours - expected).abs().max().item() < 1e-5


def test_long_texts_are_cut_keeping_the_end_token_as_transformers(tiny_clip):  # noqa: F811
    """Truth: transformers' CLIPTokenizer with truncation to the 16-token context (it keeps the end token last),
    and CLIPModel.get_text_features on those ids."""
    from mechscope.clip.models.loading import load_clip

    directory, ref = tiny_clip
    b = load_clip(directory, device="cpu", dtype="float32")
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    texts = ["a photo of " * 8 + "the cat", "the cat " * 12]
    hf_ids = hf(texts, truncation=True, max_length=16, padding=True, return_tensors="pt").input_ids
    assert hf_ids.shape[1] == 16
    assert torch.equal(b.tokenizer.batch(texts), hf_ids)
    with torch.no_grad():
        expected = _features(ref.get_text_features(input_ids=hf_ids))
    assert (b.text_embeds(texts) - expected).abs().max().item() < 1e-5


# ---- CLIP's BPE, written again from OpenAI's simple_tokenizer ------------------------------------


def _byte_alphabet() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _openai_bpe(text: str, vocab: dict[str, int], merges: list[str]) -> list[int]:
    """OpenAI's CLIP tokenizer (simple_tokenizer.py), with NFC in place of ftfy as transformers' converter does."""
    import regex

    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    alphabet = _byte_alphabet()
    text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
    pat = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    ids = [vocab["<|startoftext|>"]]
    for piece in pat.findall(text):
        chars = "".join(alphabet[b] for b in piece.encode("utf-8"))
        ids += [vocab[w] for w in openai_bpe([*chars[:-1], chars[-1] + "</w>"], ranks)]
    return ids + [vocab["<|endoftext|>"]]


def test_clip_bpe_matches_openai_algorithm(tmp_path):
    """Truth: CLIP's BPE written here from OpenAI's simple_tokenizer (numbers one digit at a time, contractions,
    punctuation runs, whitespace runs, case, accents), on a vocabulary with digit and word merges."""
    from mechscope.clip.models.tokenizer import from_dir

    vocab, merges = clip_bpe_vocab()
    extra = ["1 9", "19 9", "9 9</w>", "c a", "ca t", "cat s</w>", "' s</w>", "! !", "!! !</w>", "é t", "ét é</w>"]
    for m in extra:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    merges = merges + extra
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ours = from_dir(tmp_path, 64, vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["<|endoftext|>"])
    texts = ["1999 cats!!!", "The cat's  PHOTO\tof 42\n\ncats", "Été  été, 1999's 2024", "a.b,c;d 0xff 7/8"]
    for text in texts:
        assert ours.encode(text) == _openai_bpe(text, vocab, merges), text


# ---- image preprocessing ------------------------------------------------------------------------


def _pil_processor(**kw):
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kw)


def test_center_crop_and_normalisation_exactly_as_transformers():
    """Truth: transformers' CLIP image processor (PIL backend) with no resize: a centre crop with odd margins,
    then rescale and normalise (and with do_normalize off); no interpolation, so equal to float precision. The crop
    offset is also checked against numpy slicing by hand."""
    from PIL import Image

    from mechscope.clip.models.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocessor

    rng = np.random.default_rng(1)
    a = (rng.random((33, 37, 3)) * 255).astype(np.uint8)  # margins 3 and 7: odd
    image = Image.fromarray(a)
    for normalize in (True, False):
        cfg = {"do_resize": False, "crop_size": {"height": 30, "width": 30}, "do_normalize": normalize}
        pre = Preprocessor.from_config(cfg, 30, 3, "clip")
        proc = _pil_processor(do_resize=False, crop_size={"height": 30, "width": 30}, do_normalize=normalize)
        expected = np.asarray(proc(images=[image], return_tensors="np").pixel_values)
        ours = pre([image]).numpy()
        assert ours.shape == expected.shape == (1, 3, 30, 30)
        assert np.abs(ours - expected).max() < 1e-5
        by_hand = a[1:31, 3:33].transpose(2, 0, 1) / 255.0
        if normalize:
            by_hand = (by_hand - np.array(OPENAI_MEAN)[:, None, None]) / np.array(OPENAI_STD)[:, None, None]
        assert np.abs(ours[0] - by_hand).max() < 1e-5


def test_center_crop_of_a_smaller_image_pads_as_transformers():
    """Truth: transformers.image_transforms.center_crop, which zero-pads an image smaller than the crop and puts
    it at ceil(padding / 2) from the top and left."""
    from transformers.image_transforms import center_crop as hf_center_crop

    from mechscope.clip.models.preprocess import center_crop

    x = np.arange(3 * 5 * 6, dtype=np.float32).reshape(3, 5, 6) + 1
    expected = hf_center_crop(x, (8, 9), data_format="channels_first", input_data_format="channels_first")
    ours = center_crop(torch.from_numpy(x), (8, 9)).numpy()
    assert ours.shape == expected.shape
    assert np.array_equal(ours, expected)


def test_a_grey_model_takes_the_mean_of_three_channel_statistics():
    """Truth: numpy's mean of the three image_mean / image_std values a processor gives (its documented reading
    for a one-channel model)."""
    from mechscope.clip.models.preprocess import Preprocessor

    mean, std = [0.2, 0.5, 0.8], [0.1, 0.3, 0.35]
    pre = Preprocessor.from_config({"image_mean": mean, "image_std": std}, 30, 1, "clip")
    assert pre.mean == pytest.approx((np.mean(mean),)) and pre.std == pytest.approx((np.mean(std),))


def test_resized_pixels_are_whole_8bit_levels_near_pil():
    """Truth: PIL's bicubic resize (what CLIP's processor uses) returns 8-bit levels; ours must too, and lie within
    a few levels of PIL's on a smooth picture."""
    from PIL import Image

    from mechscope.clip.models.preprocess import Preprocessor

    rng = np.random.default_rng(2)
    image = Image.fromarray((rng.random((9, 11, 3)) * 255).astype(np.uint8)).resize((77, 61), Image.BILINEAR)
    pre = Preprocessor(30, 3, resize_hw=(30, 30), resample="bicubic", mean=(0.0,) * 3, std=(1.0,) * 3)
    levels = pre.to_unit([image])[0].numpy() * 255
    assert np.abs(levels - np.round(levels)).max() < 1e-3
    pil = np.asarray(image.resize((30, 30), Image.BICUBIC), dtype=np.float64).transpose(2, 0, 1)
    assert np.abs(levels - pil).mean() < 2.0


# ---- configs and checkpoints --------------------------------------------------------------------


def test_empty_configs_take_transformers_defaults():
    """Truth: transformers' CLIPConfig() / SiglipConfig() defaults and CLIPImageProcessor()'s (what an absent field
    means to transformers)."""
    from mechscope.clip.models.loading import clip_config
    from mechscope.clip.models.preprocess import Preprocessor

    for kind, ref in (("clip", transformers.CLIPConfig()), ("siglip", transformers.SiglipConfig())):
        c = clip_config({}, kind)
        t, v = ref.text_config, ref.vision_config
        assert (c.text.d_vocab, c.text.n_ctx, c.text.d_model, c.text.n_layers, c.text.n_heads, c.text.d_mlp) == (
            t.vocab_size, t.max_position_embeddings, t.hidden_size, t.num_hidden_layers, t.num_attention_heads,
            t.intermediate_size)  # fmt: skip
        assert (c.text.bos_token_id, c.text.eos_token_id, c.text.pad_token_id) == (
            t.bos_token_id, t.eos_token_id, t.pad_token_id)  # fmt: skip
        assert (c.vision.d_model, c.vision.image_size, c.vision.patch_size, c.vision.act, c.text.act) == (
            v.hidden_size, v.image_size, v.patch_size, v.hidden_act, t.hidden_act)  # fmt: skip
        assert c.vision.norm_eps == v.layer_norm_eps and c.text.norm_eps == t.layer_norm_eps
    assert clip_config({}, "clip").embed_dim == transformers.CLIPConfig().projection_dim
    proc = _pil_processor()
    pre = Preprocessor.from_config({}, 224, 3, "clip")
    assert pre.shortest_edge == proc.size["shortest_edge"]
    assert pre.crop_hw == (proc.crop_size["height"], proc.crop_size["width"])
    assert pre.resample == {3: "bicubic", 2: "bilinear"}[int(proc.resample)]
    assert pre.mean == pytest.approx(tuple(proc.image_mean)) and pre.std == pytest.approx(tuple(proc.image_std))
    siglip = transformers.SiglipImageProcessorPil()  # SigLIP's (bicubic in transformers 5; bilinear in 4)
    pre = Preprocessor.from_config({}, 224, 3, "siglip")
    assert pre.resample == {3: "bicubic", 2: "bilinear"}[int(siglip.resample)]
    assert pre.crop_hw is None and pre.mean == pytest.approx(tuple(siglip.image_mean))


def test_a_sharded_checkpoint_loads_every_shard(tmp_path):
    """Truth: transformers' CLIPModel saved in several safetensors shards; our embeddings equal its own."""
    from mechscope.clip.models.loading import load_clip

    ref = tiny_checkpoint(tmp_path / "one", "clip", seed=4)
    d = tmp_path / "sharded"
    ref.save_pretrained(d, max_shard_size="20KB")
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        if (tmp_path / "one" / name).is_file():
            (d / name).write_text((tmp_path / "one" / name).read_text())
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    b = load_clip(d, device="cpu", dtype="float32")
    pixels = torch.randn(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _features(ref.get_image_features(pixel_values=pixels))
        ours = b.model.encode_image(pixels)
    assert (ours - expected).abs().max().item() < 1e-5


def test_init_weights_follow_the_documented_scales():
    """Truth: the formula by hand: each weight matrix normal with sd 1/sqrt(fan-in) (fan-in: a Linear's input
    width; the patch convolution's channels × patch²), embeddings sd 0.1, gains one, biases zero, and
    logit_scale log(1/0.07)."""
    from mechscope.clip.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig

    v = VisionConfig(64, 1, 4, 256, 32, 8, n_channels=3, proj_dim=16)
    t = TextConfig(64, 1, 4, 256, 50, 8, eos_token_id=49, proj_dim=16)
    model = CLIP(CLIPConfig(v, t))
    model.init_weights(torch.Generator().manual_seed(0))
    p = {k: v.detach() for k, v in model.named_parameters()}
    assert float(p["logit_scale"]) == pytest.approx(math.log(1 / 0.07), abs=1e-4)
    for name, fan_in in (("vision.blocks.0.mlp.up.weight", 64), ("vision.blocks.0.mlp.down.weight", 256),
                         ("vision.patch_embed.weight", 3 * 8 * 8), ("text.proj.weight", 64)):  # fmt: skip
        assert float(p[name].std()) == pytest.approx(fan_in**-0.5, rel=0.1), name
    assert float(p["text.W_E"].std()) == pytest.approx(0.1, rel=0.1)
    assert float(p["vision.ln_post.w"].min()) == 1.0 == float(p["vision.ln_post.w"].max())
    assert float(p["vision.blocks.0.mlp.up.bias"].abs().max()) == 0.0


def test_texts_without_the_end_token_are_refused(tiny_clip):  # noqa: F811
    """Truth: transformers' CLIPModel reads a text lacking the end token at position 0 (the argmax of an all-false
    mask): every such text gets the start token's embedding, the same for all (checked here). mechscope refuses."""
    from mechscope.clip.models.loading import load_clip
    from mechscope.core.errors import MechscopeError

    directory, ref = tiny_clip
    b = load_clip(directory, device="cpu", dtype="float32")
    bos = clip_bpe_vocab()[0]["<|startoftext|>"]
    ids = torch.tensor([[bos, 320, 514, 330], [bos, 513, 520, 400]])
    with torch.no_grad():
        hf = _features(ref.get_text_features(input_ids=ids))
    assert torch.allclose(hf[0], hf[1], atol=1e-6)  # the hazard: two texts, one embedding
    with pytest.raises(MechscopeError, match="end-of-text token"):
        b.model.encode_text(ids)


def test_old_config_ids_with_a_tokenizer_lacking_clips_special_tokens_are_refused_in_one_line():
    """Truth: the rule for old configs (eos_token_id 2 names no token of the vocabulary): the tokenizer's own
    <|startoftext|> and <|endoftext|> are used, so a tokenizer without them cannot be read, and says so."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from mechscope.clip.models.tokenizer import ClipTokenizer, own_special_tokens
    from mechscope.core.errors import MechscopeError

    tok = ClipTokenizer(Tokenizer(WordLevel({"<unk>": 0, "a": 1, "cat": 2}, unk_token="<unk>")), 16, 0, 2, 1)
    with pytest.raises(MechscopeError, match=r"^ckpt: .*old placeholders .*no <\|startoftext\|> token"):
        own_special_tokens(tok, "ckpt")


def test_a_grey_model_reads_an_rgb_tensor_as_pil_reads_the_same_picture():
    """Truth: PIL's convert("L") (ITU-R 601-2 luma, rounded to whole levels) of the same RGB picture: a tensor and a
    PIL image of it give the same unit pixels (within PIL's rounding), pure red ~0.299, not a plain mean's 0.333."""
    from PIL import Image

    from mechscope.clip.models.preprocess import Preprocessor

    pre = Preprocessor.from_config({"do_resize": False, "do_center_crop": False, "do_normalize": False}, 8, 1, "clip")
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    rgb[0, 0] = (255, 0, 0)
    from_pil = pre.to_unit([Image.fromarray(rgb)])
    from_tensor = pre.to_unit(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])
    assert from_tensor.shape == from_pil.shape == (1, 1, 8, 8)
    assert (from_tensor - from_pil).abs().max().item() <= 0.5 / 255 + 1e-6
    assert from_tensor[0, 0, 0, 0].item() == pytest.approx(0.299, abs=1e-6)
