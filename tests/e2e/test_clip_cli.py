"""``mechscope clip`` end to end: inspect, neurons and attack on a tiny random CLIP, a short training of the small
model (which transformers loads too), and every bad input as one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.e2e.test_cli import assert_one_line_error, run_main
from tests.records import assert_round_trip

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one torch thread


def test_help_lists_the_clip_commands(capsys):
    code, out, _ = run_main(capsys, "clip", "--help")
    assert code == 0
    for cmd in ("train", "inspect", "neurons", "attack"):
        assert cmd in out


def test_inspect_with_zero_shot(capsys, tiny_clip, clip_pictures, tmp_path):
    from mechscope.clip.methods.evaluate import InspectResult

    out = tmp_path / "inspect"
    code, text, err = run_main(
        capsys,
        "clip",
        "inspect",
        "--model",
        str(tiny_clip),
        "--out",
        str(out),
        "--images",
        str(clip_pictures),
        "--prompts",
        "a photo of a cat,the cat",
        "--device",
        "cpu",
    )
    assert code == 0, err
    assert "vision.blocks.{0..1}.mlp.hook_post" in text and "img0.png" in text
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 8
    assert_round_trip(out / "inspect.json", InspectResult)
    r = InspectResult.load(out)
    assert len(r.probabilities) == 8 and all(abs(sum(p) - 1) < 1e-5 for p in r.probabilities)
    assert "Zero-shot probabilities" in r._repr_html_()


def test_inspect_siglip_in_bfloat16(capsys, tmp_path, clip_pictures):
    from mechscope.clip.methods.evaluate import InspectResult
    from tests.unit.test_clip_models import tiny_checkpoint

    d = tmp_path / "tiny-siglip"
    tiny_checkpoint(d, "siglip")
    probs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        code, text, err = run_main(
            capsys,
            "clip",
            "inspect",
            "--model",
            str(d),
            "--out",
            str(out),
            "--images",
            str(clip_pictures),
            "--prompts",
            "a cat,the photo",
            "--dtype",
            dtype,
        )
        assert code == 0, err
        r = InspectResult.load(out)
        assert r.family == "siglip" and f"dtype: {dtype}" in text
        probs[dtype] = np.asarray(r.probabilities)
    # SigLIP scores each image-text pair on its own (a sigmoid): the rows need not sum to one
    assert np.abs(probs["float32"] - probs["bfloat16"]).max() < 0.05


def test_neurons_on_a_tiny_clip(capsys, tiny_clip, mnist_root, tmp_path):
    from mechscope.clip.methods.neurons import NeuronsResult

    out = tmp_path / "neurons"
    code, text, err = run_main(
        capsys,
        "clip",
        "neurons",
        "--model",
        str(tiny_clip),
        "--out",
        str(out),
        "--per-digit",
        "3",
        "--steps",
        "3",
        "--read",
        "2",
        "--k",
        "3",
        "--controls",
        "20",
        "--words",
        "three,3,cat",
        "--neuron",
        "1.5",
    )
    assert code == 0, err
    assert "concepts have a multimodal neuron" in text and "neuron 1.5" in text
    r = NeuronsResult.load(out)
    assert len(r.multimodality.concepts) == 10 and r.readings[0].neuron == "1.5"
    assert r.readings[0].why == "asked for" and len(r.readings[0].top_images) == 3
    assert_round_trip(out / "neurons.json", NeuronsResult)
    assert "Each concept" in r._repr_html_()  # the notebook view of a result read back from its JSON
    html = (out / "report.html").read_text()
    assert "Neuron 1.5" in html and "<script src=" not in html
    code, _, err = run_main(capsys, "clip", "neurons", "--model", str(tiny_clip), "--out", str(out))
    assert_one_line_error(code, err, "--force")


def test_attack_on_a_tiny_clip(capsys, tiny_clip, clip_pictures, tmp_path):
    from mechscope.clip.methods.attack import AttackResult
    from mechscope.clip.methods.evaluate import InspectResult

    # a random model: attack the class it gives most of these images, with the other class's name
    run_main(
        capsys,
        "clip",
        "inspect",
        "--model",
        str(tiny_clip),
        "--out",
        str(tmp_path / "i"),
        "--images",
        str(clip_pictures),
        "--prompts",
        "a photo of cat,a photo of dog",
    )
    probs = np.asarray(InspectResult.load(tmp_path / "i").probabilities)
    true, other = ("cat", "dog") if (probs.argmax(1) == 0).sum() >= 4 else ("dog", "cat")
    out = tmp_path / "attack"
    code, text, err = run_main(
        capsys,
        "clip",
        "attack",
        "--model",
        str(tiny_clip),
        "--out",
        str(out),
        "--images",
        str(clip_pictures),
        "--true",
        true,
        "--word",
        other,
        "--classes",
        "cat,dog",
        "--prompt",
        "a photo of {}",
        "--k",
        "2",
        "--candidates",
        "4",
        "--controls",
        "2",
        "--label",
        "--ablate",
        "1.5",
    )
    assert code == 0, err
    assert "attack success" in text and "given neurons 1.5 ablated" in text
    assert "2 random sets of 2 neurons: mean success" in text and "before any ablation, by selection" in text
    r = AttackResult.load(out)
    assert r.target == other and r.finding.summary.k == 2 and len(r.finding.neurons) == 4
    assert r.finding.summary.given == ("1.5",) and 0.0 <= r.finding.summary.given_success <= 1.0
    assert "ablated instead" in (out / "report.html").read_text()
    assert "Control: 2 random sets of 2 neurons" in (out / "report.html").read_text()
    assert_round_trip(out / "attack.json", AttackResult)
    assert "Typographic attack" in (out / "report.html").read_text()
    assert "Neurons, ranked" in r._repr_html_()


@pytest.mark.slow
def test_train_the_small_model_and_load_it_in_transformers(capsys, mnist_root, tmp_path):
    from mechscope.clip.methods.evaluate import TrainResult
    from mechscope.clip.models.loading import load_clip

    out = tmp_path / "small"
    code, text, err = run_main(
        capsys, "clip", "train", "--out", str(out), "--steps", "20", "--train-limit", "500", "--batch", "32"
    )
    assert code == 0, err
    assert "model, train.json and report.html written" in text
    assert_round_trip(out / "train.json", TrainResult)
    b = load_clip(out, device="cpu")
    ref = transformers.CLIPModel.from_pretrained(out).eval()
    pixels = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = b.tokenizer.batch(["a handwritten three", "the word seven", "the number 3"])
    with torch.no_grad():
        diff = (
            b.model(b.preprocess.normalize(pixels), tokens)
            - ref(input_ids=tokens, pixel_values=b.preprocess.normalize(pixels)).logits_per_image
        )
    assert diff.abs().max() < 1e-5


def _accuracy(images: str, correct: int, n: int):
    from mechscope.clip.methods.evaluate import Accuracy

    k = 10  # a diagonal of ``correct`` hits spread over ten classes, the rest one class off
    conf = np.zeros((k, k), dtype=int)
    for i in range(n):
        conf[i % k, i % k if i < correct else (i + 1) % k] += 1
    return Accuracy(images, "the word {}", n, correct / n, tuple(tuple(int(v) for v in row) for row in conf))


def test_train_page_prints_standard_errors_and_says_what_is_chance():
    from mechscope.clip.methods.evaluate import TrainResult
    from mechscope.clip.report.context import train_summary
    from mechscope.clip.training import SmallSettings

    near, far = _accuracy("numerals", 15, 120), _accuracy("words (across modalities)", 148, 1000)
    lines = train_summary(TrainResult("m", {}, 1, (), (near, far), 1.0, {}))
    # 15 of 120 = 12.5%, binomial standard error √(0.125 × 0.875 / 120) = 3.0 points; 12 expected by chance
    assert "12.5% ± 3.0 of 120 (chance 10%; within two standard errors of chance)" in lines[0]
    # against chance, the spread of a guess: (0.148 - 0.1) / √(0.1 × 0.9 / 1000) = 5.1
    assert "14.8% ± 1.1 of 1000 (chance 10%; 5.1 standard errors above chance)" in lines[1]
    assert lines[2].startswith("1 of 2 accuracies are within two standard errors of chance")
    assert "meet only weakly" in lines[3] and "stay mostly apart" not in " ".join(lines)
    across = train_summary(TrainResult("m", {}, 1, (), (_accuracy("words (across modalities)", 11, 120),), 1.0, {}))
    assert "no sign that pictures and written names" in across[-1]
    history = ({"step": 0, "loss": 2.0, "accuracy": 0.1}, {"step": 1, "loss": 1.0, "accuracy": 0.2})
    settings = dict(SmallSettings().__dict__)
    html = TrainResult("m", settings, 1, history, (near, far), 1.0, {})._repr_html_()
    assert "12.5% ± 3.0" in html and "Chance (a uniform guess) is 10% in every row" in html


def test_confusion_titles_are_whole_and_counts_are_read(monkeypatch):
    from mechscope.clip.report import figures as F

    seen = []
    monkeypatch.setattr(F, "figure_data_uri", lambda fig: seen.append(fig) or "uri")
    title = "digit words in sans-oblique, serif-italic (across modalities), “a handwritten {}”:\n9.2% ± 2.6 of 120"
    F.confusion_figure(_accuracy("x", 11, 120), [str(i) for i in range(10)], title)
    ax, bar = seen[0].axes
    assert ax.get_title().replace("\n", " ") == title.replace("\n", " ")  # wrapped, not cut
    assert "share of the true class" in bar.get_ylabel()
    assert sorted(int(t.get_text()) for t in ax.texts)[-1] == 11  # the counts, in their cells


def test_train_is_deterministic(mnist_root):
    from mechscope.clip.training import SmallSettings, train
    from mechscope.cnn.data.mnist import load_mnist

    m = load_mnist(mnist_root, download_missing=False)
    s = SmallSettings(steps=3, batch=16, train_limit=200, warmup=1)
    a = train(s, m.train_images, m.train_labels).model.state_dict()
    b = train(s, m.train_images, m.train_labels).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "case",
    [
        "no-config",
        "variant",
        "not-image",
        "corrupt-image",
        "blank-word",
        "no-glyph",
        "empty-classes",
        "empty-prompt",
        "empty-word",
        "concept-word",
        "device",
        "neuron",
        "ablate",
    ],
)
def test_bad_input_is_one_line(case, capsys, tiny_clip, clip_pictures, tmp_path):
    base = ["--model", str(tiny_clip), "--out", str(tmp_path / "o")]
    if case == "no-config":
        (tmp_path / "empty").mkdir()
        args, expect = ["clip", "inspect", "--model", str(tmp_path / "empty")], "not a CLIP checkpoint"
    elif case == "variant":
        (tmp_path / "v").mkdir()
        (tmp_path / "v" / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
        args, expect = ["clip", "neurons", "--model", str(tmp_path / "v")], "unsupported variant"
    elif case in ("not-image", "corrupt-image"):
        folder = tmp_path / "mixed"
        folder.mkdir()
        (folder / "a.png").write_bytes((clip_pictures / "img0.png").read_bytes())
        bad = folder / ("notes.txt" if case == "not-image" else "broken.png")
        bad.write_bytes(b"hello" if case == "not-image" else (clip_pictures / "img1.png").read_bytes()[:60])
        args, expect = ["clip", "neurons", *base, "--images", str(folder)], bad.name
    elif case == "blank-word":
        args, expect = ["clip", "attack", *base, "--word", "   "], "renders to nothing"
    elif case == "no-glyph":
        args, expect = ["clip", "attack", *base, "--word", "日本"], "no glyph"
    elif case == "empty-classes":
        args, expect = ["clip", "attack", *base, "--classes", ""], "--classes is given an empty value"
    elif case == "empty-prompt":
        args, expect = ["clip", "inspect", *base, "--images", str(clip_pictures), "--prompts", "cat,,dog"], "is empty"
    elif case == "empty-word":  # dropped before: the words probed were not the ones given
        args, expect = ["clip", "neurons", *base, "--words", "cat,,dog"], "--words: item 2 of 3 is empty"
    elif case == "device":
        args, expect = ["clip", "inspect", *base, "--device", "cuda:7"], "cuda:7"
    elif case == "neuron":
        args, expect = ["clip", "neurons", *base, "--neuron", "1.99"], "layer 1 has neurons 0..36"
    elif case == "ablate":
        args, expect = ["clip", "attack", *base, "--ablate", "7.0"], "the image tower has layers 0..1"
    else:
        concepts = tmp_path / "concepts"
        for name in ("cat", "日本"):
            (concepts / name).mkdir(parents=True)
            (concepts / name / "a.png").write_bytes((clip_pictures / "img0.png").read_bytes())
        args, expect = ["clip", "neurons", *base, "--concepts", str(concepts)], "no glyph"
    code, _, err = run_main(capsys, *args)
    assert code == 2
    assert_one_line_error(code, err, expect)


def test_python_api_on_the_users_folders(tiny_clip, clip_pictures, tmp_path):
    """The Python API on a loaded bundle: concepts from the user's concept folders, top images from the user's
    folder, equal to the neuron's largest mean activations computed here directly; and the attack with a named
    neuron ablated."""
    import mechscope.clip as C
    from mechscope.clip.data.folder import read_folder
    from mechscope.clip.models.views import ImageModel
    from mechscope.core.hooks import run_with_cache

    b = C.load(tiny_clip, device="cpu", dtype="float32")
    concepts = tmp_path / "concepts"
    for i, name in enumerate(("cat", "dog")):
        (concepts / name).mkdir(parents=True)
        for j in range(3):
            src = clip_pictures / f"img{4 * i + j}.png"
            (concepts / name / src.name).write_bytes(src.read_bytes())
    r = C.neurons(b, images=clip_pictures, concepts=concepts, neurons=((1, 5),), read=1, steps=2, k=3, controls=10,
                  words=("cat", "dog"))  # fmt: skip
    assert [c.concept for c in r.multimodality.concepts] == ["cat", "dog"]
    assert r.multimodality.n_pictures == 6 and r.n_dataset == 8
    rd = r.readings[0]
    unit, names = read_folder(clip_pictures, b.preprocess)
    _, cache = run_with_cache(ImageModel(b.model, b.preprocess), unit, names=["vision.blocks.1.mlp.hook_post"])
    acts = cache["vision.blocks.1.mlp.hook_post"][:, :, 5].float().mean(1)
    order = acts.argsort(descending=True)[:3]
    assert rd.neuron == "1.5" and list(rd.top_images) == [names[i] for i in order]
    assert np.allclose(rd.top_values, acts[order].numpy(), atol=1e-5)
    assert "Each concept" in r._repr_html_()

    probs = np.asarray(C.inspect(b, images=clip_pictures, prompts=["a photo of cat", "a photo of dog"]).probabilities)
    true, other = ("cat", "dog") if (probs.argmax(1) == 0).sum() >= 4 else ("dog", "cat")
    a = C.attack(b, images=clip_pictures, true=true, word=other, classes=("cat", "dog"), prompt="a photo of {}", k=1,
                 candidates=2, controls=1, ablate=((0, 3),))  # fmt: skip
    s = a.finding.summary
    assert a.target == other and s.given == ("0.3",) and 0.0 <= s.given_success <= 1.0
    assert s.n_heldout + s.n_discovery == s.n_counted
