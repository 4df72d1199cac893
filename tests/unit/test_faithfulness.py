"""Faithfulness measures: curves, rank correlation, the randomisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from mechscope.cnn.data.mnist import MNIST
from mechscope.cnn.methods import attribution as A
from mechscope.cnn.methods import faithfulness as F
from mechscope.cnn.runs import load_run
from mechscope.core.stats import rankdata, spearman


def test_rankdata_and_spearman_match_scipy():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).double()  # many ties
    b = torch.randn(3, 40, generator=g, dtype=torch.float64)
    for i in range(3):
        np.testing.assert_allclose(rankdata(a[i : i + 1])[0].numpy(), stats.rankdata(a[i].numpy()))
        rho = stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic
        assert abs(spearman(a[i : i + 1], b[i : i + 1])[0].item() - rho) < 1e-10


@pytest.fixture(scope="module")
def trained(quick_run, mnist):
    model = load_run(quick_run).model
    x = MNIST.to_float(mnist.test_images[:24])
    with torch.no_grad():
        t = model(x).argmax(1)
    return model, x, t


def test_curves_shape_and_endpoints(trained):
    m, x, t = trained
    scores = F.pixel_scores(A.IntegratedGradients(n_steps=16).attribute(m, x, t))
    c = F.deletion_insertion(m, x, t, scores, steps=14)
    assert c.deletion.shape == (24, 15) and c.fractions[0] == 0 and c.fractions[-1] == 1
    # nothing removed = the full image; everything removed = the blank image; insertion mirrors it
    torch.testing.assert_close(c.deletion[:, 0], c.insertion[:, -1])
    torch.testing.assert_close(c.deletion[:, -1], c.insertion[:, 0])


def test_ig_beats_random_order(trained):
    m, x, t = trained
    scores = F.pixel_scores(A.IntegratedGradients(n_steps=32).attribute(m, x, t))
    ours = F.deletion_insertion(m, x, t, scores)
    rnd = F.deletion_insertion(m, x, t, F.random_scores(scores.shape))
    assert ours.deletion_auc < rnd.deletion_auc - 0.1
    assert ours.insertion_auc > rnd.insertion_auc + 0.1


class InputCopy(A.Attribution):
    """A 'method' that ignores the model: it returns the input (an edge detector in spirit)."""

    name = "input_copy"

    def _attribute(self, model, inputs, target):
        return inputs.clone()


def test_randomisation_check_separates_model_from_input(trained):
    m, x, t = trained
    report = F.evaluate_faithfulness(m, x[:8], t[:8], {"input_copy": InputCopy(), "saliency": A.Saliency()})
    result = report.to_dict()["methods"]
    assert report.layers == ["fc", "conv2", "conv1"]
    assert all(abs(v - 1) < 1e-9 for v in result["input_copy"]["randomisation_spearman"].values())
    assert not result["input_copy"]["passes_randomisation_check"]
    assert result["saliency"]["randomisation_spearman"]["conv1"] < 0.9
    # the model is untouched by the check
    with torch.no_grad():
        assert torch.equal(m(x).argmax(1), t)


def test_sample_sd_is_numpys_with_one_degree_of_freedom():
    from mechscope.core.stats import sample_sd

    x = np.random.default_rng(0).normal(size=(3, 8))
    np.testing.assert_allclose(sample_sd(x), np.std(x, axis=-1, ddof=1))
    assert float(sample_sd([2.0])) == 0.0 and sample_sd(np.ones((4, 1))).shape == (4,)


def test_background_pixels_neither_help_nor_hurt_a_map(trained):
    """Deleting a pixel already at the baseline changes nothing: the curves run over the other pixels, so a map that
    ranks the black background first scores as the same map without it (over every pixel it lost area)."""
    m, x, t = trained
    scores = F.pixel_scores(A.Saliency().attribute(m, x, t))
    background = (x.sum(1).flatten(1) == 0)
    loud = torch.where(background, scores + 1e6, scores)  # the background ranked first
    a, b = F.deletion_insertion(m, x, t, scores, steps=14), F.deletion_insertion(m, x, t, loud, steps=14)
    torch.testing.assert_close(a.deletion, b.deletion)
    torch.testing.assert_close(a.insertion, b.insertion)
    np.testing.assert_allclose(a.fractions.numpy(), np.arange(15) / 14)


def test_the_randomisation_check_is_judged_on_the_input_pixels():
    tied = F.MethodFaithfulness("tied", 0.2, 0.8, {"fc": 0.99, "conv1": 0.99}, {"fc": 0.5, "conv1": 0.3})
    model_blind = F.MethodFaithfulness("copy", 0.2, 0.8, {"conv1": 1.0}, {"conv1": 1.0})
    old = F.MethodFaithfulness("old record", 0.2, 0.8, {"conv1": 0.99})  # no foreground ρ: the whole image's
    blank = F.MethodFaithfulness("no foreground", 0.2, 0.8, {"conv1": 0.9}, {"conv1": float("nan")})  # blank images
    report = F.FaithfulnessReport([tied, model_blind, old, blank], 0.5, 0.5, ["fc", "conv1"], 8, 28)
    assert [report.passes(x) for x in (tied, model_blind, old, blank)] == [True, False, False, False]


def test_a_record_of_an_older_mechscope_is_told_apart_and_not_linked_by_explain(tmp_path):
    from mechscope.cnn.pipelines.explain import linked_outputs
    from mechscope.core.outputs import write_json
    from tests.records import attribution_record

    new = attribution_record(["saliency"], "abc")
    d = new.to_dict()
    assert F.FaithfulnessReport.from_dict(d).curves_over == F.CURVES_OVER
    old = {k: v for k, v in d.items() if k not in ("curves_over", "sanity_check_on")}
    assert F.FaithfulnessReport.from_dict(old).curves_over is None
    run = tmp_path / "run"
    (run / "attribution").mkdir(parents=True)
    write_json(run / "attribution" / "faithfulness.json", old)
    linked = linked_outputs(run, "abc")
    assert linked["attribution"] is None and "an older mechscope's, over the whole image" in linked["notes"][0]
