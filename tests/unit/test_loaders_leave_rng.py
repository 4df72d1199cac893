"""Loading a saved model or dictionary draws nothing from the caller's random generator.

Each loader builds a module whose initial weights are overwritten at once by the file's (or by exact weights), so a
user who seeds torch, loads, and then draws must get the draws a run without the load gives. The outside truth of
every test: the numbers ``torch.rand`` gives right after ``torch.manual_seed`` with nothing in between.
"""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.cnn.methods.replacement import StageDictionaries
from mechscope.cnn.models.cnn import CNN
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary
from mechscope.core.dictionaries.saelens_format import load_saelens, save_saelens
from mechscope.lm.methods.crosslayer import CrossLayerTranscoder
from mechscope.lm.methods.transcoders import Transcoders, empty_transcoder
from mechscope.lm.toy import ToyConfig, load_toy, train_toy
from tests.unit.test_crosslayer import random_clt, tiny3
from tests.unit.test_lm_toy_replacement_truths import _relu_model

pytestmark = pytest.mark.usefixtures("one_thread")


def leaves_rng(load) -> None:
    """``load()`` between a seed and a draw changes nothing that is drawn."""
    torch.manual_seed(11)
    expected = torch.rand(6)
    torch.manual_seed(11)
    load()
    torch.testing.assert_close(torch.rand(6), expected, rtol=0, atol=0)


def test_saelens_file_and_folded_copy(tmp_path):
    cfg = DictionaryConfig(d_in=6, d_sae=10, normalize_activations="expected_average_only_in")
    d = SparseDictionary(cfg, generator=torch.Generator().manual_seed(3))
    save_saelens(d, tmp_path / "sae", hook_name="blocks.0.hook_resid_post")
    leaves_rng(lambda: load_saelens(tmp_path / "sae"))
    leaves_rng(d.folded)


def test_cross_layer_transcoder_folder(tmp_path):
    random_clt(tiny3("gpt2"), "jumprelu", skip=True).save(tmp_path / "clt", model_name="tiny")
    leaves_rng(lambda: CrossLayerTranscoder.load(tmp_path / "clt"))


def test_exact_transcoders_built_from_weights():
    """MLP neurons as transcoders, the never-firing transcoder and a CNN's channels as transcoders."""
    model, net = _relu_model(), CNN().eval()
    leaves_rng(lambda: Transcoders.from_mlp_neurons(model))
    leaves_rng(lambda: empty_transcoder(8))
    leaves_rng(lambda: StageDictionaries.channels(net))


def test_toy_checkpoint(tmp_path):
    text = "to be, or not to be: that is the question. " * 40
    quick = dict(steps=2, d_model=16, n_heads=2, n_ctx=16, vocab=16, batch=4, checkpoints=1, min_span=4, layers=1)
    r = train_toy(ToyConfig(**quick, data="text"), text=text, out=tmp_path / "toy", progress=False)
    (tmp_path / "toy" / "training.json").write_text(json.dumps(r))
    leaves_rng(lambda: load_toy(tmp_path / "toy"))
