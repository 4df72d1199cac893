"""Parity with TransformerLens 4.3 (test-only dependency): folded weights, composition, head detectors.

How TransformerLens is run here, offline. In 4.x ``HookedTransformer`` is gone; the model is a
``TransformerBridge`` around a transformers model. ``TransformerBridge.boot_transformers(path)``
boots it from a local Hugging Face directory (``from_pretrained`` on the path, nothing fetched),
with two conditions met below:

* a tokenizer: boot loads one from the same name unless given one, and ``detect_head`` tokenises
  strings. The random checkpoints have none, so each gets a word-level tokenizer (token id i is
  the word ``<i>``, BOS prepended) saved to its own directory and passed as ``tokenizer=``
  (loaded with ``from_pretrained`` so that TransformerLens can reload it with ``add_bos_token``);
  the checkpoint directories stay exactly what our loader reads.
* HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set, and huggingface_hub's offline flag patched on, so
  that any attempt to reach the hub fails at once instead of waiting on the network.

Processed weights: ``bridge.enable_compatibility_mode()`` runs ``process_weights(fold_ln=True,
center_writing_weights=True, center_unembed=True, fold_value_biases=True)`` (HookedTransformer's
defaults) and the stacked accessors ``bridge.W_Q`` ... ``bridge.b_U`` then read the processed
weights. Layouts are TransformerLens' and ours alike (W_Q [L, H, D, Dh], W_O [L, H, Dh, D],
W_in [L, D, M], W_out [L, M, D], W_U [D, V]) with one conversion: TransformerLens keeps grouped
K/V weights per key/value head ([L, G, D, Dh]) where we expand them to query heads, so theirs
is expanded with ``repeat_interleave(H // G, dim=1)`` (query head h reads kv head h // (H/G), the
layout of ``bridge._expand_kv_heads`` and of transformers' ``repeat_kv``). Bias-free projections
(Llama) are ``None`` on their side and zeros on ours.

Head detectors: TransformerLens' ``detect_head`` ("mul" measure, the default) scores a head by
``Σ_{q,k} A[q,k]·D[q,k] / Σ_{q,k} A[q,k]``: attention mass on the detection pattern D averaged
over *every* query position (the denominator is the sequence length P, BOS included), while our
``masked_score`` averages only over the designated queries (previous-token: positions 1..P-1;
duplicate: queries with an earlier copy of their token; induction: the n second-half positions
of BOS + n + n). The target keys coincide exactly (TL's induction pattern is our ``prefix_mask``
target; on a repeated sequence without repeats inside a half it is our ``induction_mask``
stripe), so ``TL = ours · |queries| / P`` per sequence. Both formulas are checked in both
directions: TL's on our patterns and ours on TL's patterns.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from transformer_lens import ActivationCache  # noqa: E402
from transformer_lens.head_detector import detect_head  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

from mechscope.core.hooks import run_with_cache  # noqa: E402
from mechscope.lm.methods.composition import composition_scores  # noqa: E402
from mechscope.lm.methods.scores import (  # noqa: E402
    attention_scores,
    duplicate_mask,
    induction_mask,
    masked_score,
    prefix_mask,
    previous_token_mask,
)
from mechscope.lm.models.folding import analysis_weights, raw_weights  # noqa: E402
from mechscope.lm.models.loading import load_model  # noqa: E402

warnings.filterwarnings("ignore", module="transformers")
warnings.filterwarnings("ignore", module="transformer_lens")

ATOL = 1e-5
WEIGHTS = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O", "W_in", "b_in", "W_gate", "W_out", "b_out")
WEIGHTS += ("W_E", "W_pos", "W_U", "b_U")
GROUPED = ("W_K", "b_K", "W_V", "b_V")  # per key/value head on TransformerLens' side
QK_GAIN = 6.0
N = 20  # tokens per half: BOS + 2N = 41 positions < n_ctx 64 (detect_head needs seq_len < n_ctx)


@pytest.fixture(scope="module", autouse=True)
def offline():
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def save_random(model_cls, config, path):
    """As in test_transformers.py: random weights, norms and biases perturbed so that a mix-up shows.

    One addition: query and key weights ×QK_GAIN, so that attention is far from uniform (at the
    default initialisation every head attends almost evenly and a pattern mix-up would hardly show).
    """
    torch.manual_seed(0)
    model = model_cls(config).eval()
    d = config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_GAIN)
            elif name.endswith("c_attn.weight"):  # GPT-2's Conv1D [D, 3D] = query | key | value
                p[:, : 2 * d].mul_(QK_GAIN)
    model.save_pretrained(path)


def word(i: int) -> str:
    return f"<{i}>"  # delimited: special tokens match inside words, and "t1" would split "t135" into t1 + unk


def word_tokenizer(vocab: int, bos: int, path):
    """Token id i is the word "<i>"; saved and reloaded so that its name_or_path is a local directory."""
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({word(i): i for i in range(vocab)}, unk_token=word(0)))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": word(bos), "eos_token": word(bos), "pad_token": word(bos), "unk_token": word(0)}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, **special).save_pretrained(path)
    return transformers.PreTrainedTokenizerFast.from_pretrained(path)


CONFIGS = {
    "gpt2": (
        transformers.GPT2LMHeadModel,
        transformers.GPT2Config(
            n_layer=3, n_embd=64, n_head=4, vocab_size=500, n_positions=64, bos_token_id=499, eos_token_id=499
        ),
    ),
    **{
        name: (
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(
                num_hidden_layers=2,
                hidden_size=64,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=96,
                vocab_size=300,
                max_position_embeddings=64,
                rope_theta=5000.0,
                tie_word_embeddings=tied,
                bos_token_id=1,
                eos_token_id=2,
                rms_norm_eps=1e-5,
            ),
        )
        for name, tied in (("llama-gqa", False), ("llama-gqa-tied", True))
    },
}


class Pair:
    """Our model and TransformerLens' on one checkpoint: a raw bridge and a processed one."""

    def __init__(self, name, root):
        model_cls, config = CONFIGS[name]
        self.path = root / "model"
        save_random(model_cls, config, self.path)
        self.vocab, self.bos = config.vocab_size, config.bos_token_id
        self.model, _ = load_model(self.path)
        self.model.eval()
        tok = word_tokenizer(self.vocab, self.bos, root / "tokenizer")
        self.raw = TransformerBridge.boot_transformers(str(self.path), device="cpu", tokenizer=tok)
        self.processed = TransformerBridge.boot_transformers(str(self.path), device="cpu", tokenizer=tok)
        self.processed.enable_compatibility_mode(disable_warnings=True)  # fold_ln, centring, value biases

    @functools.cached_property
    def view(self):
        return analysis_weights(self.model)

    @functools.cached_property
    def composition(self) -> dict[str, torch.Tensor]:
        return composition_scores(self.view)

    def text(self, tokens: torch.Tensor) -> str:
        """The string that TransformerLens tokenises back to ``tokens`` (BOS dropped: its tokenizer adds it)."""
        assert tokens[0] == self.bos
        return " ".join(word(int(t)) for t in tokens[1:])


_PAIRS: dict[str, Pair] = {}


def get_pair(name: str, tmp_path_factory) -> Pair:
    if name not in _PAIRS:
        _PAIRS[name] = Pair(name, tmp_path_factory.mktemp(name))
    return _PAIRS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return get_pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])  # tied Llama: same attention as untied
def dpair(request, tmp_path_factory):
    return get_pair(request.param, tmp_path_factory)


def expand_kv(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    return t.repeat_interleave(n_heads // t.shape[1], dim=1)


def theirs_weight(bridge, name: str):
    try:
        t = getattr(bridge, name)
    except AttributeError:  # bias-free projection, or no learned positions (Llama W_pos)
        return None
    if t is not None and name in GROUPED:
        t = expand_kv(t, bridge.cfg.n_heads)
    return None if t is None else t.detach().float()


# ---- (a) folded weights ------------------------------------------------------------------------


def test_folded_weights_equal_processed(pair):
    ours = pair.view
    compared = []
    for name in WEIGHTS:
        mine, theirs = getattr(ours, name), theirs_weight(pair.processed, name)
        if theirs is None:
            # TransformerLens has no such tensor: bias-free projection (our zeros), no gate, no W_pos
            assert mine is None or not mine.any(), f"{name}: TransformerLens has none, ours is non-zero"
            continue
        assert mine is not None, f"{name}: TransformerLens has it, our view does not"
        assert mine.shape == theirs.shape, f"{name}: ours {tuple(mine.shape)}, theirs {tuple(theirs.shape)}"
        torch.testing.assert_close(mine, theirs, rtol=0, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        compared.append(name)
    llama = pair.model.cfg.norm == "rmsnorm"
    expected = {"W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "W_E", "W_U", "b_U"}
    expected |= {"W_gate"} if llama else {"b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "W_pos"}
    assert expected <= set(compared), sorted(expected - set(compared))


def test_processing_changes_the_weights(pair):
    """So that the comparison above is not one of two untouched copies: folding moves every matrix it reads."""
    folded, raw = pair.view, raw_weights(pair.model)
    names = ("W_Q", "W_K", "W_V", "W_U", "W_in")
    if pair.model.cfg.norm == "layernorm":  # writing weights centred too
        names += ("W_O", "W_E", "W_pos", "b_O")
    for name in names:
        assert (getattr(folded, name) - getattr(raw, name)).abs().max() > 1e-3, name


def test_raw_views_equal_unprocessed(pair):
    """The unprocessed bridge exposes the checkpoint's weights: our raw view is the same (GQA expanded)."""
    ours = raw_weights(pair.model)
    for name in ("W_Q", "W_K", "W_V", "W_O", "W_E", "W_U"):
        torch.testing.assert_close(getattr(ours, name), theirs_weight(pair.raw, name), rtol=0, atol=ATOL)


# ---- (b) composition scores --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["Q", "K", "V"])
def test_composition_scores_equal(pair, mode):
    ours = pair.composition[mode]
    theirs = pair.processed.all_composition_scores(mode).scores.detach().float()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
    L = ours.shape[0]
    later = torch.arange(L)[:, None] < torch.arange(L)[None, :]
    assert (ours[later[:, None, :, None].expand_as(ours)] > 0).all()  # every earlier→later pair scored


# ---- forward: our logits and TransformerLens' unprocessed and processed forward ------------------


def test_logits_equal_bridge_forward(pair):
    x = torch.randint(3, pair.vocab - 1, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pair.model(x)
        raw = pair.raw(x)
        processed = pair.processed(x)
    torch.testing.assert_close(ours, raw, rtol=0, atol=ATOL)
    # processed weights: the same function up to a shift per position (center_unembed)
    centred = ours - ours.mean(-1, keepdim=True)
    torch.testing.assert_close(centred, processed - processed.mean(-1, keepdim=True), rtol=0, atol=ATOL)


# ---- (c) head detectors ------------------------------------------------------------------------


def repeated(pair, seed: int) -> torch.Tensor:
    """BOS + N distinct random tokens + the same N: the induction protocol without repeats inside a half."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randperm(pair.vocab - 4, generator=g)[:N] + 3  # ids 3 .. vocab-2: neither BOS nor <0> (unk)
    assert not (half == pair.bos).any()
    return torch.cat([torch.tensor([pair.bos]), half, half])


def random_text(pair, seed: int) -> torch.Tensor:
    """BOS + 2N tokens from a small range: many duplicates, at irregular distances."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([pair.bos]), torch.randint(3, 15, (2 * N,), generator=g)])


def our_patterns(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    _, cache = run_with_cache(model, tokens[None], names=names)
    return {k: v[0] for k, v in cache.items()}  # [H, P, P]


def tl_patterns(bridge, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(bridge.cfg.n_layers)]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    return {k: cache[k][0].float() for k in names}


def our_masks(tokens: torch.Tensor, protocol: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our masks on one sequence, keyed by TransformerLens' head names."""
    p = tokens.shape[0]
    masks = {"previous_token_head": previous_token_mask(p), "duplicate_token_head": duplicate_mask(tokens[None])}
    # TL's induction pattern is exactly our prefix-matching target (keys whose previous token is q's)
    masks["induction_head"] = induction_mask(p, N) if protocol == "repeated" else prefix_mask(tokens[None], 0)
    return masks


def score_from_patterns(patterns, layers, masks) -> dict[str, torch.Tensor]:
    return {
        name: torch.stack([masked_score(patterns[f"blocks.{i}.attn.hook_pattern"][None], *m) for i in range(layers)])
        for name, m in masks.items()
    }


def query_count(mask) -> float:
    return float(mask[1].sum())


@pytest.fixture(scope="module")
def detector_runs(dpair):
    """Per sequence: tokens, both sides' patterns, our scores, TL's detect_head scores (its own run and ours)."""
    pair = dpair
    runs = []
    for protocol, make in (("repeated", repeated), ("random", random_text)):
        for seed in (0, 1):
            tokens = make(pair, seed)
            text = pair.text(tokens)
            assert torch.equal(pair.raw.to_tokens(text)[0].cpu(), tokens), "TL's tokenizer must give the same ids"
            ours_p, tl_p = our_patterns(pair.model, tokens), tl_patterns(pair.raw, tokens)
            masks = our_masks(tokens, protocol)
            ours = {k: torch.as_tensor(v).float() for k, v in attention_scores(pair.model, tokens[None], masks).items()}
            our_cache = ActivationCache(dict(ours_p), pair.raw, has_batch_dim=False)
            tl, tl_on_ours = {}, {}
            for name in masks:
                tl[name] = detect_head(pair.raw, text, name).float()
                tl_on_ours[name] = detect_head(pair.raw, text, name, cache=our_cache).float()
            runs.append(
                dict(
                    protocol=protocol,
                    tokens=tokens,
                    text=text,
                    ours_p=ours_p,
                    tl_p=tl_p,
                    masks=masks,
                    ours=ours,
                    ours_on_tl=score_from_patterns(tl_p, pair.model.cfg.n_layers, masks),
                    tl=tl,
                    tl_on_ours=tl_on_ours,
                )
            )
    return runs


def test_attention_patterns_equal(detector_runs):
    for run in detector_runs:
        for name, pattern in run["ours_p"].items():
            torch.testing.assert_close(pattern, run["tl_p"][name], rtol=0, atol=ATOL)


def test_detection_targets_coincide(detector_runs):
    """TL's detection patterns D mark exactly our target keys (so only the query set differs)."""
    from transformer_lens import head_detector as hd

    for run in detector_runs:
        t = run["tokens"][None]
        for name, (target, _) in run["masks"].items():
            D = getattr(hd, f"get_{name}_detection_pattern")(t)
            assert torch.equal(D.bool(), target.reshape(D.shape)), (run["protocol"], name)


def test_induction_targets_differ_when_a_half_repeats_a_token():
    """Our induction stripe is positional (q attends q - n + 1); TL's pattern is by token, as prefix matching.

    On BOS + n + n where the random half itself repeats a token, TL also counts the successor of
    every other earlier occurrence, and first-half queries: its target is our ``prefix_mask``.
    """
    from transformer_lens import head_detector as hd

    half = torch.tensor([5, 6, 7, 5, 8, 9])  # token 5 twice within the half
    n = half.shape[0]
    tokens = torch.cat([torch.tensor([1]), half, half])
    D = hd.get_induction_head_detection_pattern(tokens[None]).bool()
    stripe, _ = induction_mask(tokens.shape[0], n)
    assert torch.equal(D, prefix_mask(tokens[None], 0)[0][0])
    extra = (D & ~stripe).nonzero().tolist()
    # query 4 (first half, second 5) -> key 2 (after the first 5); query 7 (second half, 5) -> key 5;
    # query 10 (second half, second 5) -> keys 2 and 8 besides its stripe key 5
    assert extra == [[4, 2], [7, 5], [10, 2], [10, 8]]
    assert not (stripe & ~D).any()


def test_tl_formula_on_our_patterns(detector_runs):
    """detect_head fed our cached patterns gives what detect_head gives on its own forward pass."""
    for run in detector_runs:
        for name in run["tl"]:
            torch.testing.assert_close(run["tl_on_ours"][name], run["tl"][name], rtol=0, atol=ATOL)


def test_our_formula_on_tl_patterns(detector_runs):
    """masked_score on TL's cached patterns gives our attention_scores."""
    for run in detector_runs:
        for name in run["ours"]:
            torch.testing.assert_close(run["ours_on_tl"][name], run["ours"][name], rtol=0, atol=ATOL)


def test_scores_differ_only_by_query_normalisation(detector_runs):
    """TL's "mul" score = ours · |our queries| / P: TL averages over every position, BOS included."""
    for run in detector_runs:
        p = run["tokens"].shape[0]
        for name, mask in run["masks"].items():
            torch.testing.assert_close(run["tl"][name], run["ours"][name] * query_count(mask) / p, rtol=0, atol=ATOL)


def test_batches_tl_averages_prompts_ours_pools_queries(dpair, detector_runs):
    """Over several prompts detect_head averages the per-prompt scores; ours pools every designated query.

    The two agree when every prompt has as many designated queries (previous-token, induction on
    BOS + n + n) and differ for duplicate-token scores on text, where the count varies.
    """
    pair = dpair
    for protocol in ("repeated", "random"):
        runs = [r for r in detector_runs if r["protocol"] == protocol]
        batch = torch.stack([r["tokens"] for r in runs])
        masks = our_masks(batch[0], protocol)
        masks["duplicate_token_head"] = duplicate_mask(batch)
        if protocol == "random":
            masks["induction_head"] = prefix_mask(batch, 0)
        pooled = attention_scores(pair.model, batch, masks)
        for name in runs[0]["tl"]:
            both = detect_head(pair.raw, [r["text"] for r in runs], name).float()
            torch.testing.assert_close(both, torch.stack([r["tl"][name] for r in runs]).mean(0), rtol=0, atol=ATOL)
            counts = torch.tensor([query_count(r["masks"][name]) for r in runs])
            weighted = (torch.stack([r["ours"][name] for r in runs]) * counts[:, None, None]).sum(0) / counts.sum()
            torch.testing.assert_close(torch.as_tensor(pooled[name]).float(), weighted, rtol=0, atol=ATOL)
