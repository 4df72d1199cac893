"""Model loading and the folded view against outside truths: huggingface_hub's own reading of its settings,
transformers on the same checkpoints, and numpy means of the folded weights (the weight files themselves:
test_weight_files_truths)."""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mechscope.core.errors import MechscopeError
from mechscope.lm.models import hub
from mechscope.lm.models.checkpoint import open_checkpoint
from mechscope.lm.models.folding import analysis_weights, folded_model, raw_weights
from mechscope.lm.models.loading import check_config, load_model
from mechscope.lm.models.transformer import HookedTransformer
from tests.fuzz.builders import gpt2_state, write_hf_dir
from tests.unit.test_folding import random_model

# ---- hub ids -------------------------------------------------------------------------------------


def test_the_same_revision_in_the_id_and_the_argument_is_one_revision():
    """Truth: ``repo@rev`` and ``revision=rev`` name one revision, not two (only differing ones conflict)."""
    assert hub.split_revision("EleutherAI/pythia-70m@step1", "step1") == ("EleutherAI/pythia-70m", "step1")
    assert hub.split_revision("EleutherAI/pythia-70m", "step2") == ("EleutherAI/pythia-70m", "step2")


@pytest.fixture()
def empty_online_cache(tmp_path, monkeypatch):
    """A private, empty HF cache; the hub's host made unresolvable, so a download attempt ends at once."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_host_unresolved", lambda: "huggingface.co")


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "maybe"])
def test_hf_hub_offline_set_false_is_online(empty_online_cache, monkeypatch, value):
    """Truth: huggingface_hub's own reading of the variable (``constants._is_true``): ``value`` means online, so
    the download path is taken (here: it finds the host unresolvable) instead of the offline refusal (false, no and
    off read as offline before)."""
    import huggingface_hub.constants as c

    assert c._is_true(value) is False
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(MechscopeError, match=r"\(offline: huggingface\.co does not resolve\)"):
        hub.resolve_hub("EleutherAI/pythia-70m")


@pytest.mark.parametrize("value", ["1", "true", "ON", "Yes"])
def test_hf_hub_offline_set_true_refuses_without_a_download(empty_online_cache, monkeypatch, value):
    """Truth: huggingface_hub's ``constants._is_true``: ``value`` means offline, so nothing is fetched and the refusal
    is the offline one (no host lookup in it)."""
    import huggingface_hub.constants as c

    assert c._is_true(value) is True
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(MechscopeError) as e:
        hub.resolve_hub("EleutherAI/pythia-70m")
    assert "does not resolve" not in str(e.value)


def test_unresolvable_host_counts_only_without_a_proxy(monkeypatch):
    """Truth: the host of ``HF_ENDPOINT`` as urllib parses it; a proxy resolves names itself."""

    def no_dns(*a, **k):
        raise socket.gaierror("no name")

    for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org:8443/x")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert hub.hub_host_unresolved() == "hub.example.org"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub.hub_host_unresolved() == ""


LISTINGS = [
    (["config.json", "pytorch_model.bin"], True),
    (["config.json", "model.safetensors", "pytorch_model.bin"], False),
]


@pytest.mark.parametrize("files, bins", LISTINGS)
def test_download_patterns_fall_back_to_bin_files(monkeypatch, files, bins):
    """Truth: a repository listing as Pythia's training-step revisions have it (``pytorch_model.bin`` only): the
    .bin files are then fetched; with safetensors present they are not."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: files)
    patterns = hub._patterns("EleutherAI/pythia-70m", "step3000")
    assert ("pytorch_model.bin" in patterns) is bins and "model.safetensors" in patterns


# ---- load_model ----------------------------------------------------------------------------------


def test_revision_for_a_local_folder_is_refused(tmp_path):
    """Truth: a revision names a hub commit; a folder on disk has none."""
    directory = write_hf_dir(tmp_path / "m")
    with pytest.raises(MechscopeError, match="a revision \\('main'\\) needs a hub id"):
        load_model(directory, revision="main", device="cpu")


def test_device_and_device_map_together_are_refused(tmp_path):
    """Truth: the documented contract, "give a device or a device map, not both"."""
    with pytest.raises(MechscopeError, match="not both"):
        load_model(write_hf_dir(tmp_path / "m"), device="cpu", device_map="auto")


def gpt2_logits_agree(directory):
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    model, _ = load_model(directory, device="cpu")
    x = torch.randint(0, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x).logits, rtol=1e-4, atol=1e-4)


def test_tied_head_saved_beside_the_embedding_loads_as_transformers(tmp_path):
    """Truth: transformers' GPT-2 on a tied checkpoint that also stores ``lm_head.weight`` (a copy of wte)."""
    directory = write_hf_dir(tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    save_file(state | {"lm_head.weight": state["transformer.wte.weight"].clone()}, str(directory / "model.safetensors"))
    gpt2_logits_agree(directory)


def test_old_attention_mask_buffers_load_as_transformers(tmp_path):
    """Truth: transformers' GPT-2 on a checkpoint with the ``attn.bias`` / ``attn.masked_bias`` buffers older
    versions saved (no weights: ignored)."""
    directory = write_hf_dir(tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    n = json.loads((directory / "config.json").read_text())["n_positions"]
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(n, n)).view(1, 1, n, n)
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(state, str(directory / "model.safetensors"))
    gpt2_logits_agree(directory)


def test_an_integer_weight_is_refused(tmp_path):
    """Truth: a checkpoint whose ``ln_f.bias`` was saved as int32 (save_file keeps the dtype): not a weight."""
    directory = write_hf_dir(tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    state["transformer.ln_f.bias"] = torch.arange(state["transformer.ln_f.bias"].numel(), dtype=torch.int32)
    save_file(state, str(directory / "model.safetensors"))
    with pytest.raises(MechscopeError, match="is int32; expected floating point"):
        load_model(directory, device="cpu")


# ---- the folded analysis view ------------------------------------------------------------------------


def test_layernorm_view_writes_a_mean_free_stream():
    """Truth: numpy means over d_model of every weight that writes into the stream (W_E, W_pos, W_O, b_O, W_out,
    b_out): zero once centred, as LayerNorm's mean subtraction makes any such component invisible."""
    view = analysis_weights(random_model("layernorm"))
    for name in ("W_E", "W_pos", "W_O", "b_O", "W_out", "b_out"):
        w = np.asarray(getattr(view, name), np.float64)
        assert np.abs(w.mean(axis=-1)).max() < 1e-6, name
        assert np.abs(w).max() > 0.1, name  # and not zero


def test_without_centring_the_unembedding_the_logits_are_exactly_the_models():
    """Truth: the model's own logits. With ``center_unembed=False`` the folded model (gains 1, biases 0) gives them
    as they are, no shift per position; and W_U then keeps its numpy mean over the vocabulary."""
    model = random_model("layernorm")
    view = analysis_weights(model, center_unembed=False)
    folded, b_U = folded_model(view)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens) + b_U, model(tokens), rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(view.W_U).mean(axis=-1)).max() > 1e-3


def test_centred_unembedding_has_a_zero_mean_bias():
    """Truth: numpy's mean over the vocabulary of the folded b_U (nonzero before: LayerNorm's bias folded into it)."""
    model = random_model("layernorm")
    assert np.abs(np.asarray(analysis_weights(model, center_unembed=False).b_U).mean()) > 1e-3
    assert abs(float(np.asarray(analysis_weights(model).b_U, np.float64).mean())) < 1e-6


def test_rmsnorm_view_does_not_claim_centred_writing_weights():
    """Truth: RMSNorm subtracts no mean, so writing weights are left as they are (the raw W_O) and the sentence
    does not say otherwise."""
    model = random_model("rmsnorm", kv_heads=2, gated=True)
    view = analysis_weights(model)
    assert torch.equal(view.W_O, raw_weights(model).W_O)
    assert "writing weights centred" not in view.describe() and "norm gains folded" in view.describe()
    assert "writing weights centred" in analysis_weights(random_model("layernorm")).describe()


def test_raw_view_of_a_qk_norm_model_folds_no_gains():
    """Truth: the checkpoint's W_Q (no QK-norm gain applied) and so no scale-free folds claimed."""
    model = random_model("rmsnorm", kv_heads=2, gated=True)
    cfg = replace(model.cfg, qk_norm=True)
    qk = HookedTransformer(cfg)
    qk.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        for block in qk.blocks:
            block.attn.q_norm.w.fill_(3.0)
    raw = raw_weights(qk.eval())
    assert raw.scale_free == () and "folded as directions" not in raw.describe()
    assert torch.equal(raw.W_Q[0], qk.blocks[0].attn.W_Q.detach())
    assert analysis_weights(qk).scale_free == ("qk_norm",)


def test_header_length_one_past_the_file_is_refused(tmp_path):
    """Truth: safetensors' own ``safe_open`` refuses a file whose u64 header length claims one byte more than the
    file holds (the header itself is valid JSON, so only the length check can tell)."""
    raw = json.dumps({"__metadata__": {"format": "pt"}}).encode()
    (tmp_path / "model.safetensors").write_bytes((len(raw) + 1).to_bytes(8, "little") + raw)
    with pytest.raises(SafetensorError):
        safe_open(tmp_path / "model.safetensors", "pt")
    with pytest.raises(MechscopeError, match="runs past the file's end"):
        open_checkpoint(tmp_path)


def test_a_layer_without_its_mlp_leaves_the_mlps_out_of_the_view():
    """Truth: the partial-checkpoint contract ("None where a partial checkpoint lacks them"): with layer 1's MLP
    input matrix absent (on the meta device, named in ``missing_weights``) the view holds no MLP weights, and its
    attention weights are the full model's."""
    model = random_model("layernorm")
    full = analysis_weights(model)
    up = model.blocks[1].mlp.up
    up.weight = torch.nn.Parameter(torch.empty(up.weight.shape, device="meta"))
    model.missing_weights = ("blocks.1.mlp.up.weight",)
    view = analysis_weights(model)
    assert view.W_in is None and view.W_out is None and view.b_out is None
    assert torch.equal(view.W_Q, full.W_Q) and torch.equal(view.W_O, full.W_O)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def gains_model(cfg, seed: int) -> HookedTransformer:
    """A model of ``cfg`` with gains 1 ± 0.5 and every other weight N(0, 0.3²), seeded."""
    torch.manual_seed(seed)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.5 * torch.randn_like(p) if name.endswith(".w") else torch.randn_like(p) * 0.3)
    return model.eval()


def test_scale_free_gains_scale_the_biases_too():
    """Truth: RMSNorm(v)·g ∝ v⊙g, so a query after QK-norm points along (ln1(x) W_Q + b_Q)⊙g and an attention output
    after ln1_post along (Σ_h z_h W_O + b_O)⊙g (z_h holding the value bias): numpy cosines of 1 between the model's
    modules run by hand and the view (a Qwen3-like model with attention biases, which Qwen3's ``attention_bias``
    allows)."""
    model = random_model("rmsnorm", kv_heads=2, gated=True)
    cfg = replace(model.cfg, qk_norm=True, post_attn_mlp_norm=True, attn_bias=True, attn_out_bias=True)
    qk = gains_model(cfg, 6)
    view, block = analysis_weights(qk), qk.blocks[0]
    x, z = torch.randn(cfg.d_model), torch.randn(cfg.n_heads, cfg.d_head)
    with torch.no_grad():
        q_model = block.attn.q_norm(block.attn.q(block.ln1(x)).view(cfg.n_heads, cfg.d_head)).numpy()
        out_model = block.ln1_post(block.attn.o(z.reshape(-1))).numpy()
    x_hat = (x / x.pow(2).mean().add(cfg.norm_eps).sqrt()).numpy()  # RMSNorm without its gain, by hand
    q_view = np.einsum("d,hde->he", x_hat, view.W_Q[0].numpy()) + view.b_Q[0].numpy()
    z_free = (z - view.value_bias[0]).numpy()  # b_V W_O is in the view's b_O: z less the value bias
    out_view = np.einsum("he,hed->d", z_free, view.W_O[0].numpy()) + view.b_O[0].numpy()
    np.testing.assert_allclose(_cosines(q_model, q_view), 1.0, atol=1e-5)
    np.testing.assert_allclose(_cosines(out_model, out_view), 1.0, atol=1e-5)


def test_partial_checkpoint_with_one_tensor_per_layer_loads(tmp_path):
    """Truth: a 2-layer GPT-2 folder holding only the two layers' ``c_attn.weight`` (as many tensors as layers: not
    a corrupt layer count), loaded as a partial checkpoint; block 1's query weights are numpy's slices of the written
    Conv1D matrix [D, 3D] (head h: columns h·Dh to (h+1)·Dh)."""
    directory = write_hf_dir(tmp_path / "m", tokenizer="none")
    config = json.loads((directory / "config.json").read_text()) | {"n_layer": 2}
    (directory / "config.json").write_text(json.dumps(config))
    w = [gpt2_state(seed)["transformer.h.0.attn.c_attn.weight"] for seed in (1, 2)]
    save_file({f"transformer.h.{i}.attn.c_attn.weight": w[i] for i in (0, 1)}, str(directory / "model.safetensors"))
    model, _ = load_model(directory, partial_ok=True, device="cpu")
    assert "blocks.1.attn.q.weight" not in model.missing_weights and "W_E" in model.missing_weights
    d, h = config["n_embd"], config["n_head"]
    want = w[1].numpy()[:, :d].reshape(d, h, d // h).transpose(1, 0, 2)
    np.testing.assert_array_equal(model.blocks[1].attn.W_Q.detach().numpy(), want)


def test_key_value_heads_must_divide_the_heads():
    """Truth: grouped-query attention shares each key/value head among n_heads / n_kv_heads query heads
    (transformers' ``repeat_kv``): 4 heads cannot share 3."""
    cfg = replace(random_model("rmsnorm", kv_heads=2, gated=True).cfg, n_kv_heads=3)
    with pytest.raises(MechscopeError, match="4 attention heads cannot share 3 key/value heads"):
        check_config(cfg, "here")


def test_a_train_toy_folder_is_named_as_one(tmp_path):
    """Truth: a folder holding ``training.json`` (what ``lm train-toy`` writes) and no config.json."""
    (tmp_path / "training.json").write_text("{}")
    with pytest.raises(MechscopeError, match="config.json is missing.*a train-toy run"):
        load_model(tmp_path, device="cpu")
