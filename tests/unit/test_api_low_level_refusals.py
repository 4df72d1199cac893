"""The lower-level Python API a notebook calls beside the pipelines refuses a user's mistake in one line of
mechscope's own error, where it raised torch's or numpy's from deep inside, or ran on silently (a negative head
counted from the end, a replacement of NaN, a sample of -5 tokens read as 95); and what it accepts still gives the
numbers it gave. Found by a bad-input sweep of the API as a new user."""

from __future__ import annotations

import re

import pytest
import torch

from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.core import intervene as A
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.errors import HookError, MechscopeError
from mechscope.core.hooks import attached_hooks, hooks
from mechscope.lm.methods import composition as C
from mechscope.lm.methods import weights_circuits as WC
from mechscope.lm.methods.direct import direct_logit_attribution, logit_lens
from mechscope.lm.methods.neurons import read_neurons, top_activations
from mechscope.lm.models.folding import analysis_weights
from tests.unit.test_attribution_graph_lm import TOKENS, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def refused(match: str, fn, *args, **kwargs) -> str:
    """The one-line MechscopeError ``fn`` raises; its message matches ``match``."""
    with pytest.raises(MechscopeError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def lm():
    model = tiny("gpt2")
    return model, analysis_weights(model)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return CNN(CNNConfig(channels=(4, 8))).eval()


# ---- hooks and the models' forwards -------------------------------------------------------------------------


def test_a_hook_returning_what_cannot_stand_for_the_activation_is_one_line_and_leaves_no_hook(lm):
    """A string was AttributeError deep in the block, a wrong width a matmul's error; a [P, D] return for an MLP's
    output [1, P, D] (what the local replacement's hooks give) still stands for it: the logits of the full shape."""
    model, _ = lm
    t = TOKENS[None]
    bad = {"returned str": lambda a, hook: "x", r"returned shape \[1, 8, 3\]": lambda a, hook: a[..., :3]}
    for said, fn in bad.items():
        with pytest.raises(HookError, match=said):
            with hooks(model, fwd=[("blocks.0.hook_resid_post", fn)]):
                model(t)
        assert attached_hooks(model) == []
    with hooks(model, fwd=[("blocks.0.hook_mlp_out", lambda a, hook: 2 * a[0])]):
        squeezed = model(t)
    with hooks(model, fwd=[("blocks.0.hook_mlp_out", lambda a, hook: 2 * a)]):
        full = model(t)
    assert torch.equal(squeezed, full)


def test_the_transformers_entry_points_refuse_a_stream_of_the_wrong_width_or_blocks_out_of_range(lm):
    model, _ = lm
    x = model.embed(TOKENS[None])
    refused(r"residual stream \[batch, positions, 16\], got \[1, 3, 8\]", model.run_blocks, torch.zeros(1, 3, 8))
    refused(r"residual stream \[\.\.\., 16\], got \[1, 3, 8\]", model.unembed, torch.zeros(1, 3, 8))
    for start, stop in ((-1, None), (2, 1), (0.5, None), (0, -1)):  # -1 ran the last block alone
        refused("with 0 <= start <= stop, got", model.run_blocks, x, start, stop)
    assert torch.equal(model.run_blocks(x, 0, 2), model.run_blocks(x))


def test_the_cnn_refuses_images_of_the_wrong_shape_or_dtype(cnn):
    """Each was conv2d's or a matmul's RuntimeError (the channels' one lists conv2d's signatures)."""
    x = torch.rand(2, 1, 28, 28)
    for bad in (x[0], torch.rand(2, 3, 28, 28), torch.rand(2, 1, 32, 32)):
        refused(r"expected input shaped \[batch, 1, 28, 28\]", cnn, bad)
    refused("expected torch.float32 pixels .the model's dtype., got torch.float64", cnn, x.double())
    refused("expected a tensor input, got str", cnn, "img")
    assert cnn(x).shape == (2, 10)


def test_feature_visualisation_refuses_units_and_settings_it_cannot_take(cnn):
    """A channel past the layer's was an IndexError (-1 the last channel), batch 0 an MKL FFT error, lr NaN Adam's,
    a diversity group of 0 a ZeroDivisionError; an objective in range renders as before (same seed, same images)."""
    from mechscope.cnn.methods import featvis as FV

    def run(obj, **kw):
        return FV.render(cnn, obj, kw.pop("batch", 2), steps=2, param="pixel", **kw)

    refused(r"conv1.hook_out: unit 9 out of range 0\.\.3", run, FV.channel("conv1.hook_out", 9))
    refused(r"unit -1 out of range", run, FV.channel("conv1.hook_out", -1))
    refused("one unit index or one per image", run, FV.channel("conv1.hook_out", [0, 1, 2]))
    refused("one unit index or one per image", run, FV.class_logit(1.5))
    refused(r"y must be an integer from 0 to 11", run, FV.neuron("conv1.hook_out", 0, y=99))
    refused("batch must be", run, FV.channel("conv1.hook_out", 0), batch=0)
    refused("lr must be a positive finite number", run, FV.channel("conv1.hook_out", 0), lr=float("nan"))
    refused("value_range must be", run, FV.channel("conv1.hook_out", 0), value_range=(1.0, 0.0))
    refused("a diversity group must be", FV.diversity, "conv1.hook_out", 0)
    refused("do not split into groups of 2", run, FV.diversity("conv1.hook_out", 2), batch=3)
    a, b = run(FV.channel("conv1.hook_out", [0, 3])), run(FV.channel("conv1.hook_out", torch.tensor([0, 3])))
    assert torch.equal(a.images, b.images)


# ---- interventions ----------------------------------------------------------------------------------------


def test_interventions_refuse_what_torch_raised_on_or_ran_with(cnn):
    x, layer = torch.rand(6, 1, 28, 28), "conv1.hook_out"
    masks = A.channel_masks((4, 12, 12), [0, 3])
    refused("a channel must be an integer, got 1.5", A.channel_masks, (4, 12, 12), [1.5])
    refused(r"a replacement of shape \[3\] does not fit", A.ablate, cnn, x, layer, masks, "mean", torch.zeros(3))
    refused("holds NaN or inf", A.intervene, cnn, x, layer, masks, float("nan"))
    refused("batch_size must be", A.ablate, cnn, x, layer, masks, "zero", batch_size=0)
    refused("at least one input", A.layer_means, cnn, x[:0], [layer])
    refused(r"labels must lie in 0\.\.9, got 2\.\.11", A.class_accuracy, torch.tensor([11, 2]), 10)
    refused("labels must be a 1-D tensor", A.class_accuracy, torch.tensor([1.0, 2.0]), 10)
    refused(r"expected logits \[k, 2, 10\]", A.class_accuracy(torch.tensor([1, 2]), 10), torch.zeros(1, 2, 5))


def test_a_mean_of_the_layers_shape_or_one_that_broadcasts_gives_the_same_ablation(cnn):
    """Truth: a per-channel mean [C, 1, 1] broadcast by hand to [C, H, W] ablates to the same logits."""
    x, layer = torch.rand(6, 1, 28, 28), "conv1.hook_out"
    masks = A.channel_masks((4, 12, 12), [0, 3])
    mean = torch.arange(4.0)[:, None, None]
    got = A.ablate(cnn, x, layer, masks, "mean", mean)
    assert torch.equal(got, A.ablate(cnn, x, layer, masks, "mean", mean.expand(4, 12, 12).clone()))


def test_patching_takes_two_different_classes_of_the_data_and_at_least_one_pair():
    """(0, 10) of ten classes was an IndexError, (-1, 0) patched the last class, (3, 3) a gap of 0 (every share NaN),
    n_pairs 0 "no correctly classified test images"; a pair by name is the pair by index."""
    from mechscope.cnn.methods.activations import ExplainData, collect
    from mechscope.cnn.methods.patching import patching_study
    from mechscope.cnn.models.spec import walk
    from tests.unit.test_discovery_cnn import stroke_cnn, strokes

    model = stroke_cnn()
    x, y = strokes(8, seed=3)
    data = ExplainData(x, y, x[:4], x[:0], y[:0], ("vertical", "horizontal"))
    spec = walk(model)
    acts = collect(model, spec, data)
    for pair, said in (((0, 2), "patching class 2 out of range"), ((-1, 0), "patching class -1 out of range"),
                       ((1, 1), "two different classes"), ((0,), "two classes")):  # fmt: skip
        refused(said, patching_study, model, spec, data, acts, pair)
    refused("n_pairs must be", patching_study, model, spec, data, acts, (0, 1), 0)
    by_name = patching_study(model, spec, data, acts, ("vertical", "horizontal"), 2)
    assert by_name.to_dict() == patching_study(model, spec, data, acts, (0, 1), 2).to_dict()


# ---- the language methods ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,said",
    [
        (lambda m, w: WC.ov_copying(w, [(0, 2)]), "head 0.2 out of range"),
        (lambda m, w: WC.ov_copying(w, [(0, -1)]), "head 0.-1 out of range"),  # was the last head
        (lambda m, w: WC.ov_copying(w, [(0.5, 0)]), "pair of integers"),
        (lambda m, w: WC.ov_copying(w, [(0, 0)], k=0), "k must be"),
        (lambda m, w: WC.ov_copying(w, [(0, 0)], sample=-5), "sample must be"),  # was 95 of 100 tokens
        (lambda m, w: WC.ov_copying(w, [(0, 0)], token_range=(20, 10)), "is empty"),
        (lambda m, w: WC.qk_token_pairs(w, [(1, 5)]), "head 1.5 out of range"),
        (lambda m, w: WC.qk_token_pairs(w, [(1, 0)], sample=4, k=17), "from 1 to 16"),
        (lambda m, w: WC.positional_qk(w, n=0), "n must be"),
        (lambda m, w: WC.positional_qk(w, max_offset=-1), "max_offset must be"),
        (lambda m, w: WC.skip_trigrams(w, layer=-1), "layer must be"),  # was the last layer
        (lambda m, w: WC.skip_trigrams(w, k=-3), "k must be"),
        (lambda m, w: C.composition_scores(m), "analysis weights"),
        (lambda m, w: C.all_composition(w, top_n=-1), "top_n must be"),
        (lambda m, w: C.random_baseline(0, 16), "d_model must be"),
        (lambda m, w: C.random_baseline(32, 16, samples=0), "samples must be"),  # was a baseline of NaN
        (lambda m, w: analysis_weights("model"), "takes a loaded model"),
    ],
)
def test_weight_circuits_refuse_heads_sizes_and_objects_they_cannot_take(lm, call, said):
    refused(said, call, *lm)


def test_weight_circuits_in_range_are_unchanged(lm):
    """Truth: the largest entry of head 1.0's QK table over a sample, written out by hand from the folded weights."""
    _, view = lm
    got = WC.qk_token_pairs(view, [(1, 0)], sample=32, k=1).pairs[0][0]
    emb = WC.normalised(view.W_E[:], view)
    q = emb @ view.W_Q[1, 0].double() + view.b_Q[1, 0].double()
    k = emb @ view.W_K[1, 0].double() + view.b_K[1, 0].double()
    s = (q @ k.T) / view.cfg.d_head**0.5
    i, j = divmod(int(s.argmax()), s.shape[1])
    assert got[:2] == (i, j) and got[2] == pytest.approx(float(s.max()))


def test_direct_attribution_and_the_logit_lens_take_one_sequence_of_token_ids(lm):
    model, view = lm
    refused(r"a tensor \[P\] or \[1, P\], got list", direct_logit_attribution, model, view, [1, 2, 3])
    refused("got str", logit_lens, model, "abc")
    refused("is empty", direct_logit_attribution, model, view, torch.zeros(0, dtype=torch.long))
    refused("outside the vocabulary", logit_lens, model, torch.tensor([1, 99]))
    refused(r"got \[2, 8\]", logit_lens, model, torch.stack([TOKENS, TOKENS]))


def test_neurons_refuse_sizes_sites_and_layers_they_cannot_take(lm):
    model, _ = lm
    t = torch.randint(1, 32, (6, 8), generator=torch.Generator().manual_seed(0))
    refused("k must be", top_activations, model, t, [0], k=0)
    refused(r"expected a token sample \[N, P\], got \[8\]", top_activations, model, t[0], [0])
    refused("batch must be", top_activations, model, t, [0], batch=0)
    refused("layers must be a list", top_activations, model, t, 0)  # 0 was every layer
    refused("--site must be one of", top_activations, model, t, [0], site="bogus")  # was read as "post"
    refused("an MLP layer must be an integer", top_activations, model, t, [1.5])
    refused("before must be", read_neurons, model, t, name="x", k=5, min_count=1, before=-2)


def test_a_neurons_result_from_the_api_shows_itself_and_says_what_its_sample_was(lm, tmp_path):
    """The template read the pipeline's sample seed and source, which the API leaves out (jinja's UndefinedError);
    the sentence now names the sequences given, their count and length (6 x 8, 48 positions)."""
    model, _ = lm
    t = torch.randint(1, 32, (6, 8), generator=torch.Generator().manual_seed(0))
    r = read_neurons(model, t, name="x", k=5, min_count=1)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", r._repr_html_()))
    assert "sample: the 6 sequences of 8 tokens given, 48 positions counted." in text
    r.save_html(tmp_path / "n.html")
    assert "the 6 sequences of 8 tokens given" in (tmp_path / "n.html").read_text()


# ---- sparse dictionaries ------------------------------------------------------------------------------------


def test_a_skip_transcoder_decodes_only_with_an_input_for_each_row_of_latents():
    """A wrong width was view()'s RuntimeError, other rows a matmul's; the right input decodes as forward does."""
    torch.manual_seed(0)
    d = SparseDictionary(DictionaryConfig(d_in=16, d_sae=32, transcoder=True, d_out=8, skip=True))
    x = torch.randn(3, 16)
    f = d.encode(x)
    refused(r"last dimension to be 16, got shape \(5, 8\)", d.decode, f, torch.randn(5, 8))
    refused(r"an input x for each row of latents \[3\], got \[4\]", d.decode, f, torch.randn(4, 16))
    assert torch.allclose(d.decode(f, x), d(x).output, atol=1e-6)


# ---- settings the graph and clip commands check before any work ---------------------------------------------


def test_the_same_qk_attribution_or_clip_neuron_asked_twice_is_refused(lm):
    """``--qk 3.0 --qk 3.0`` computed and wrote the same attribution twice; ``--neuron 0.1 --neuron 0.1`` read the
    neuron twice. Two different asks of one head (other positions) stay allowed."""
    from mechscope.clip.pipelines.neurons import NeuronSettings
    from mechscope.lm.pipelines.attribution_graph import check_qk

    model, _ = lm
    refused(r"--qk 1\.0 given more than once", check_qk, model, [(1, 0), (1, 0)], 8)
    refused(r"--qk 1\.0@7:3 given more than once", check_qk, model, [(1, 0, 7, 3), (1, 1), (1, 0, 7, 3)], 8)
    check_qk(model, [(1, 0), (1, 0, 7), (1, 0, 7, 3)], 8)
    refused(r"--neuron 0\.1 given more than once", NeuronSettings(neurons=((0, 1), (2, 3), (0, 1))).validate)
    NeuronSettings(neurons=((0, 1), (0, 2))).validate()


def test_an_intervention_on_no_feature_id_says_the_id_format_first():
    from mechscope.core.attribution_graph import check_asked

    said = refused("only feature nodes", check_asked, [["0.1.9999"]])
    assert said.startswith("--ablate '0.1.9999' is not a feature node's id LAYER_FEATURE_POS (for example 1_12_5)")


# ---- what the checks above must still take (a reviewer's finds) ----------------------------------------------


def test_the_checks_still_take_arrays_tensors_autocast_and_tiny_contexts(lm):
    """Layers as a numpy array or a tensor were read as true or false by a new check (numpy's "truth value of an
    array is ambiguous"); run_blocks takes a 0-d tensor and reads a stop past the last block as the last block, as
    a slice does; the CNN takes bfloat16 pixels under autocast; positional QK of a 4-position model keeps its
    default offsets 0..4 (offsets past the context are NaN, as before)."""
    import numpy as np

    from mechscope.lm.methods.neurons import top_activations as top

    model, view = lm
    t = torch.randint(1, 32, (6, 8), generator=torch.Generator().manual_seed(0))
    want = top(model, t, [1, 0], k=2)
    for layers in (np.array([1, 0]), torch.tensor([1, 0])):
        got = top(model, t, layers, k=2)
        assert got.hooks == ("blocks.1.mlp.hook_post", "blocks.0.mlp.hook_post") and torch.equal(
            got.values, want.values
        )
    x = model.embed(TOKENS[None])
    assert torch.equal(model.run_blocks(x, torch.tensor(1)), model.run_blocks(x, 1))
    assert torch.equal(model.run_blocks(x, 0, 5), model.run_blocks(x))
    torch.manual_seed(0)
    net = CNN(CNNConfig(channels=(4, 8))).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net(torch.rand(2, 1, 28, 28).bfloat16()).shape == (2, 10)
    short = WC.positional_qk(view, n=4)
    assert short.offset_mass.shape == (2, 2, 5) and np.isnan(short.offset_mass[..., 4]).all()


def test_the_weight_analyses_still_run_without_autograd(lm, monkeypatch):
    """A helper inserted above analysis_weights and direct_logit_attribution took their @torch.no_grad()."""
    import mechscope.lm.methods.direct as D
    import mechscope.lm.models.folding as FO

    model, view = lm
    seen = []
    for mod, name in ((FO, "check_foldable"), (D, "run_with_cache")):
        inner = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _f=inner, **k: (seen.append(torch.is_grad_enabled()), _f(*a, **k))[1])
    analysis_weights(model)
    direct_logit_attribution(model, view, TOKENS)
    assert seen == [False, False]
