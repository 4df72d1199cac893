"""Parity with transformers: random GPT-2 and Llama checkpoints, and SmolLM2 from its GGUF file."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mechscope.core.hooks import attached_hooks, hooks, run_with_cache  # noqa: E402
from mechscope.lm.models.loading import load_model, smollm2_path  # noqa: E402

warnings.filterwarnings("ignore", module="transformers")


def save_random(model_cls, config, path):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    cfg = transformers.GPT2Config(
        n_layer=3, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=499, eos_token_id=499
    )
    path = tmp_path_factory.mktemp("gpt2")
    return save_random(transformers.GPT2LMHeadModel, cfg, path), path


def llama_config(kv_heads, tied):
    return transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        intermediate_size=96,
        vocab_size=300,
        max_position_embeddings=64,
        rope_theta=5000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        rms_norm_eps=1e-5,
    )


@pytest.fixture(scope="module", params=[(4, False), (2, False), (1, True)], ids=["mha", "gqa", "mqa-tied"])
def llama(request, tmp_path_factory):
    kv, tied = request.param
    path = tmp_path_factory.mktemp("llama")
    return save_random(transformers.LlamaForCausalLM, llama_config(kv, tied), path), path


def tokens(vocab, n=2, p=24, seed=0):
    return torch.randint(3, vocab, (n, p), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_gpt2_logits(gpt2):
    ref, path = gpt2
    model, _ = load_model(path)
    x = tokens(500)
    with torch.no_grad():
        assert_logits_close(model(x), ref(x).logits)


def test_gpt2_from_pytorch_bin(gpt2, tmp_path):
    ref, path = gpt2
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model, _ = load_model(tmp_path)
    x = tokens(500)
    with torch.no_grad():
        assert_logits_close(model(x), ref(x).logits)


def test_llama_logits(llama):
    ref, path = llama
    model, _ = load_model(path)
    x = tokens(300)
    with torch.no_grad():
        assert_logits_close(model(x), ref(x).logits)


def greedy_reference(ref, x, n):
    out = ref.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0, eos_token_id=None)
    return out


def test_greedy_generation_matches_gpt2(gpt2):
    ref, path = gpt2
    model, _ = load_model(path)
    x = tokens(300, n=1, p=6, seed=3)
    assert torch.equal(model.generate(x, 20, stop_at_eos=False), greedy_reference(ref, x, 20))


def test_greedy_generation_matches_llama(llama):
    ref, path = llama
    model, _ = load_model(path)
    x = tokens(300, n=1, p=6, seed=3)
    assert torch.equal(model.generate(x, 20, stop_at_eos=False), greedy_reference(ref, x, 20))


def test_per_head_weights_match_reference_gpt2(gpt2):
    ref, path = gpt2
    model, _ = load_model(path)
    attn = model.blocks[1].attn
    w = ref.transformer.h[1].attn.c_attn.weight  # [D, 3D], x @ w
    torch.testing.assert_close(attn.W_Q[2], w[:, 2 * 16 : 3 * 16])  # head 2 of 4, d_head 16
    torch.testing.assert_close(attn.W_O[3], ref.transformer.h[1].attn.c_proj.weight[3 * 16 : 4 * 16])
    assert attn.W_K.shape == (4, 64, 16) and attn.W_O.shape == (4, 16, 64)


def test_per_head_weights_match_reference_llama(llama):
    """Every head's W_Q and W_O, and every key/value group's W_K and W_V, value by value against the projections'
    rows (nn.Linear: x @ weight.T), so a wrong grouping of the key/value heads shows here, not only in the logits."""
    ref, path = llama
    model, _ = load_model(path)
    g = model.cfg.kv_heads
    for layer, (ours, theirs) in enumerate(zip(model.blocks, ref.model.layers, strict=True)):
        a, r = ours.attn, theirs.self_attn
        assert a.W_K.shape == a.W_V.shape == (g, 64, 16), layer
        for h in range(4):
            rows = slice(16 * h, 16 * (h + 1))
            torch.testing.assert_close(a.W_Q[h], r.q_proj.weight[rows].T, rtol=0, atol=0)
            torch.testing.assert_close(a.W_O[h], r.o_proj.weight[:, rows].T, rtol=0, atol=0)
        for k in range(g):
            rows = slice(16 * k, 16 * (k + 1))
            torch.testing.assert_close(a.W_K[k], r.k_proj.weight[rows].T, rtol=0, atol=0)
            torch.testing.assert_close(a.W_V[k], r.v_proj.weight[rows].T, rtol=0, atol=0)
    assert model.W_U.shape == (64, 300)


def test_hooks_on_transformer(gpt2):
    _, path = gpt2
    model, _ = load_model(path)
    x = tokens(500)
    with torch.no_grad():
        plain = model(x)
        names = ["blocks.1.attn.hook_result", "blocks.1.hook_attn_out", "blocks.1.attn.hook_pattern"]
        logits, cache = run_with_cache(model, x, names=names)
    torch.testing.assert_close(logits, plain, rtol=1e-5, atol=1e-5)  # explicit attention path = fused path
    assert set(cache) == set(names)
    result = cache["blocks.1.attn.hook_result"]
    assert result.shape == (2, 24, 4, 64)
    torch.testing.assert_close(
        result.sum(2) + model.blocks[1].attn.b_O, cache["blocks.1.hook_attn_out"], rtol=1e-5, atol=1e-5
    )
    pattern = cache["blocks.1.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 24))
    assert pattern.triu(1).abs().max() == 0  # causal

    def drop_head(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    with torch.no_grad(), hooks(model, fwd=[("blocks.1.attn.hook_z", drop_head)]):
        edited = model(x)
    # by hand: subtract head 2's output from layer 1's attention output
    with torch.no_grad(), hooks(model, fwd=[("blocks.1.hook_attn_out", lambda a, h: a - result[:, :, 2])]):
        expected = model(x)
    torch.testing.assert_close(edited, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited, plain, atol=1e-3)
    assert attached_hooks(model) == []


def test_config_fields_fail_loudly(gpt2, tmp_path):
    _, path = gpt2
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    from mechscope.core.errors import MechscopeError

    for change, message in [
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"some_new_trick": 1}, "unsupported GPT-2 config field 'some_new_trick'"),
        ({"model_type": "bert"}, "unsupported architecture 'bert'"),
        ({"model_type": None}, r"^no model_type \(the architecture\) in .*config.json; supported: gpt2,"),  # not 'None'
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(MechscopeError, match=message):
            load_model(tmp_path)


# ---- SmolLM2: ours from the GGUF file against transformers' own GGUF loader -------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_path()
    except Exception as e:  # the package is installed by `make`; say so rather than fail obscurely
        pytest.skip(str(e))
    pytest.importorskip("accelerate")
    ours, tok = load_model("smollm2")
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return ours, tok, ref.eval()


def test_smollm2_logits_and_generation(smollm2):
    ours, tok, ref = smollm2
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"
    x = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        assert_logits_close(ours(x), ref(x).logits)
    prompt = torch.tensor([tok.encode("The capital of France is")])
    mine = ours.generate(prompt, 20, stop_at_eos=False)
    assert torch.equal(mine, greedy_reference(ref, prompt, 20))
    assert "Paris" in tok.decode(mine[0, prompt.shape[1] :].tolist())
