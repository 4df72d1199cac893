"""CLIP and SigLIP checkpoints in mechscope: parity with transformers on tiny random models built offline, the
tokenizers, the image preprocessing, hook points, and the variants refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechscope.core.errors import MechscopeError

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def clip_bpe_vocab():
    """A tiny CLIP-style BPE vocabulary: the byte alphabet with and without ``</w>``, a few merges, the specials."""
    from mechscope.lm.tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [a + "</w>" for a in alphabet]
    merges = ["t h", "th e</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def random_pictures(directory, n: int = 8):
    """``n`` seeded 40×50 RGB noise images, img0.png ..., in ``directory``."""
    from PIL import Image

    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((g.random((40, 50, 3)) * 255).astype(np.uint8)).save(directory / f"img{i}.png")
    return directory


def tiny_checkpoint(
    directory, family: str = "clip", seed: int = 0, image_size: int = 30, patch: int = 6, channels: int = 3
):
    """A random transformers CLIPModel (or SiglipModel) with a tokenizer and a processor config, saved to
    ``directory``; returns the transformers model (eval mode, float32)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    if family == "clip":
        cfg = transformers.CLIPConfig(
            text_config=dict(
                **tower,
                vocab_size=len(vocab),
                max_position_embeddings=16,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            ),
            vision_config=dict(**tower, image_size=image_size, patch_size=patch, num_channels=channels),
            projection_dim=24,
            logit_scale_init_value=2.3,
        )
        model = transformers.CLIPModel(cfg)
        tok = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
        (directory / "vocab.json").write_text(json.dumps(vocab))
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        proc = {
            "do_resize": True,
            "size": {"shortest_edge": image_size},
            "resample": 3,
            "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "do_convert_rgb": True,
            "image_processor_type": "CLIPImageProcessor",
        }
    else:
        cfg = transformers.SiglipConfig(
            text_config=dict(
                **tower,
                vocab_size=len(vocab),
                max_position_embeddings=12,
                pad_token_id=vocab["<|endoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                bos_token_id=vocab["<|startoftext|>"],
                projection_size=32,
            ),
            vision_config=dict(**tower, image_size=image_size, patch_size=patch, num_channels=channels),
        )
        model = transformers.SiglipModel(cfg)
        with torch.no_grad():
            for p in model.parameters():  # SigLIP initialises several parts to zero: randomise every weight
                p.add_(torch.randn_like(p) * 0.05)
        tok = transformers.CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges])
        proc = {
            "do_resize": True,
            "size": {"height": image_size, "width": image_size},
            "resample": 2,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
        }
    model.eval()
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(proc))
    return model


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip") / "tiny-clip"
    return d, tiny_checkpoint(d, "clip")


@pytest.fixture(scope="module")
def tiny_siglip(tmp_path_factory):
    d = tmp_path_factory.mktemp("siglip") / "tiny-siglip"
    return d, tiny_checkpoint(d, "siglip")


TEXTS = ["a photo of a cat", "the cat", "photo", "of the a cat photo of a cat the"]


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_parity_with_transformers(family, tiny_clip, tiny_siglip):
    from mechscope.clip.models.loading import load_clip

    directory, ref = tiny_clip if family == "clip" else tiny_siglip
    b = load_clip(directory, device="cpu", dtype="float32")
    pixels = torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(1))
    tokens = b.tokenizer.batch(TEXTS)
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    if family == "clip":
        expected_ids = hf_tok(TEXTS, padding=True, return_tensors="pt").input_ids
        assert torch.equal(tokens, expected_ids)
    with torch.no_grad():
        out = ref(input_ids=tokens, pixel_values=pixels)
        img = ref.get_image_features(pixel_values=pixels)
        txt = ref.get_text_features(input_ids=tokens)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        ours_img = b.model.encode_image(pixels)
        ours_txt = b.model.encode_text(tokens)
        logits = b.model(pixels, tokens)
    for a, e in ((ours_img, img), (ours_txt, txt), (logits, out.logits_per_image)):
        assert a.shape == e.shape
        assert (a - e).abs().max().item() < 1e-5, (a - e).abs().max().item()
    assert out.logits_per_image.std() > 0.01  # a test of something


def test_clip_tokenizer_from_vocab_and_merges(tiny_clip, tmp_path):
    from mechscope.clip.models.tokenizer import from_dir

    directory, _ = tiny_clip
    only = tmp_path / "bpe"
    only.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (only / name).write_text((directory / name).read_text())
    vocab, _ = clip_bpe_vocab()
    ours = from_dir(only, 16, vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["<|endoftext|>"])
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for text in ["A  Photo of THE cat!", "3 cats", "ph0to"]:
        assert ours.encode(text) == hf(text).input_ids


def test_hook_points_on_every_block(tiny_clip):
    from mechscope.clip.models.loading import load_clip
    from mechscope.core.hooks import run_with_cache

    b = load_clip(tiny_clip[0], device="cpu")
    names = [f"{t}.blocks.{i}.{h}" for t in ("vision", "text") for i in range(2)
             for h in ("hook_resid_post", "attn.hook_pattern", "mlp.hook_post")]  # fmt: skip
    pixels = torch.randn(2, 3, 30, 30)
    _, cache = run_with_cache(b.model, pixels, b.tokenizer.batch(["a cat", "the photo"]), names=names)
    assert cache["vision.blocks.1.mlp.hook_post"].shape == (2, 26, 37)  # 25 patches and the class token
    pattern = cache["text.blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.triu(1), torch.zeros(())), "the text tower is causal"
    assert cache["vision.blocks.0.attn.hook_pattern"].triu(1).abs().sum() > 0, "the image tower is not"


def test_preprocessing_follows_transformers(tiny_clip, tiny_siglip):
    from PIL import Image

    from mechscope.clip.models.loading import load_clip

    rng = np.random.default_rng(0)
    base = (rng.random((47, 61, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(base).resize((183, 141), Image.BILINEAR)  # smooth, as photos are
    for directory, _ in (tiny_clip, tiny_siglip):
        b = load_clip(directory, device="cpu")
        proc = transformers.AutoImageProcessor.from_pretrained(directory, backend="pil")
        expected = torch.as_tensor(np.asarray(proc(images=[image], return_tensors="np").pixel_values))
        ours = b.preprocess([image])
        assert ours.shape == expected.shape
        diff = (ours - expected).abs()
        # torch's antialiased interpolation is not PIL's to the last level: within ~2 levels of 255 on average
        assert diff.mean().item() < 0.03 and diff.max().item() < 0.5, (diff.mean().item(), diff.max().item())


@pytest.mark.parametrize("case", ["no-config", "not-a-dir", "vision-only", "siglip2", "bert", "missing-weights"])
def test_unsupported_directories_are_one_line(case, tmp_path, tiny_clip):
    from mechscope.clip.models.loading import load_clip

    d = tmp_path / case
    if case == "not-a-dir":
        d.write_text("x")
    else:
        d.mkdir()
    kinds = {"vision-only": "clip_vision_model", "siglip2": "siglip2", "bert": "bert"}
    if case in kinds:
        (d / "config.json").write_text(json.dumps({"model_type": kinds[case]}))
    if case == "missing-weights":
        (d / "config.json").write_text((tiny_clip[0] / "config.json").read_text())
        (d / "tokenizer.json").write_text((tiny_clip[0] / "tokenizer.json").read_text())
    with pytest.raises(MechscopeError) as e:
        load_clip(d, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    expected = {
        "no-config": "not a CLIP checkpoint",
        "not-a-dir": "not a directory",
        "vision-only": "unsupported",
        "siglip2": "unsupported variant",
        "bert": "not a supported",
        "missing-weights": "no weights",
    }[case]
    assert expected in msg


def test_texts_the_tokenizer_cannot_tell_apart_are_refused(tiny_clip, tiny_siglip):
    """The small model's characters: '名前' and '数字' were both read as unknown tokens, and `clip inspect` scored
    every image 50/50 between two identical prompts. Class prompts a tokenizer reads alike are refused too."""
    from mechscope.clip.methods.evaluate import zero_shot_model
    from mechscope.clip.models.loading import load_clip
    from mechscope.clip.models.tokenizer import ClipTokenizer, char_ids, char_tokenizer

    ids = char_ids()
    tok = ClipTokenizer(char_tokenizer(), 32, ids["bos"], ids["eos"], ids["eos"])
    assert tok.encode("A handwritten 3") == tok.encode("a handwritten 3")  # lower-cased, every character known
    for text, chars in (("名前", "'前', '名'"), ("hello, world!", "'!', ','")):
        with pytest.raises(MechscopeError, match=f"has {chars} outside this model's vocabulary"):
            tok.encode(text)
    for model in (tiny_clip[0], tiny_siglip[0]):  # byte-level BPE (both): its unknown token is the end token
        b = load_clip(model, device="cpu")
        assert len(b.tokenizer.encode("名前 cat!")) > 2
    # SentencePiece (Unigram, SigLIP's kind) keeps only an unk_id: read from the tokenizer's JSON
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import Unigram

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), ("c", -2.0), ("a", -2.0), ("t", -2.0)]
    unigram = Tokenizer(Unigram(pieces, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    sp = ClipTokenizer(unigram, 16, None, 1, 0, pad_to_context=True)
    assert sp.encode("cat")[-1] == 1 and 2 not in sp.encode("cat")
    with pytest.raises(MechscopeError, match="has '名前' outside this model's vocabulary"):
        sp.encode("cat 名前")
    b = load_clip(tiny_clip[0], device="cpu")
    with pytest.raises(MechscopeError, match="'Cat' and 'cat' are the same tokens to this model$"):
        zero_shot_model(b, ["dog", "Cat", "cat"])
    with pytest.raises(MechscopeError, match=r"the same tokens to this model \(cut to its context of 16 tokens\)"):
        zero_shot_model(b, ["a " * 30 + "cat", "a " * 30 + "dog"])
    zero_shot_model(b, ["dog", "cat"])
