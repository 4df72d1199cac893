"""Compare mechscope's dictionaries and metrics with SAELens on the same weights and activations.

Not a test (pytest does not collect it): SAELens is not a mechscope dependency. Run it in a scratch venv
that has sae-lens, with mechscope's source on the path:

    python3 -m venv /tmp/saelens-venv2 && /tmp/saelens-venv2/bin/pip install torch==2.13.0 sae-lens
    /tmp/saelens-venv2/bin/python tests/dictionaries/reference_saelens.py

(sae-lens 6.52+ requires transformer-lens < 4, so pip picks transformer-lens 3.9; with transformer-lens
4.3.0 pinned pip falls back to sae-lens 6.51.1, which installs but fails to import:
``transformer_lens.HookedTransformer`` was removed in transformer-lens 4.)

What it does: trains small mechscope dictionaries on planted features (synthetic.py), saves them with
``save_saelens``, loads each directory with SAELens' own ``SAE.load_from_disk``, and compares
1. the forward pass (latents and outputs, max |difference|) on 8192 activations;
2. SAELens' ``get_sparsity_and_variance_metrics`` (l0, mse, explained_variance, cossim, l2_ratio,
   relative_reconstruction_bias) and ``get_downstream_reconstruction_metrics`` (CE loss score, KL) with
   mechscope's metrics.py, both run on a tiny language model whose ``blocks.0.hook_resid_post`` holds the
   planted activations (token id n has activation row n; logits are a fixed random unembedding).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from mechscope.core.dictionaries import (  # noqa: E402
    DictionaryConfig,
    StreamingMetrics,
    TrainConfig,
    ce_loss_recovered,
    kl_divergence,
    planted_features,
    save_saelens,
    train,
)

warnings.filterwarnings("ignore")
HOOK = "blocks.0.hook_resid_post"
ROWS, CTX, BATCH = 8192, 32, 16  # 8192 activations = 256 sequences of 32 tokens; 16 sequences a batch
METHODS = {
    "relu": dict(architecture="relu", l1_coefficient=2.0),
    "topk": dict(architecture="topk", k=4),
    "batchtopk": dict(architecture="batchtopk", k=4),
    "jumprelu": dict(architecture="jumprelu", l0_coefficient=2.0, bandwidth=0.2, init_threshold=0.5),
}


def tiny_model(acts: torch.Tensor):
    """A HookedRootModule: token n -> activation row n at ``blocks.0.hook_resid_post`` -> fixed unembedding."""
    from transformer_lens.hook_points import HookedRootModule, HookPoint

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.hook_resid_post = HookPoint()

    class Tiny(HookedRootModule):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding.from_pretrained(acts.clone(), freeze=True)
            self.blocks = nn.ModuleList([Block()])
            self.unembed = nn.Linear(acts.shape[1], 512)
            with torch.no_grad():
                self.unembed.weight.copy_(torch.randn(512, acts.shape[1], generator=torch.Generator().manual_seed(9)))
                self.unembed.bias.zero_()
            self.setup()

        def forward(self, tokens, return_type="logits", loss_per_token=False, **_):
            logits = self.unembed(self.blocks[0].hook_resid_post(self.embed(tokens)))
            if return_type == "logits":
                return logits
            targets = tokens[:, 1:] % 512
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="none")
            loss = loss.reshape(targets.shape) if loss_per_token else loss.mean()
            return loss if return_type == "loss" else (logits, loss)

    return Tiny().eval()


class Store:
    """What SAELens' evals read from an ActivationsStore: successive batches of token sequences."""

    def __init__(self) -> None:
        self.next = 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        seqs = torch.arange(self.next, self.next + n) % (ROWS // CTX)
        self.next += n
        return seqs[:, None] * CTX + torch.arange(CTX)[None, :]


def ours_metrics(model, lm, acts: torch.Tensor) -> dict:
    acc = StreamingMetrics(acts.shape[1], model.cfg.d_sae)
    clean, spliced, ablated, kl, kl_abl = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, ROWS // CTX, BATCH):
            tokens = Store().get_batch_tokens(BATCH + start)[start:]
            x = lm.embed(tokens)
            out, f = model(x)
            acc.update(x.reshape(-1, x.shape[-1]), out.reshape(-1, x.shape[-1]), f.reshape(-1, f.shape[-1]))
            logits = {name: lm.unembed(h) for name, h in (("clean", x), ("sae", out), ("zero", torch.zeros_like(x)))}
            targets = tokens[:, 1:] % 512
            for name, bucket in (("clean", clean), ("sae", spliced), ("zero", ablated)):
                flat = logits[name][:, :-1].flatten(0, 1)
                bucket.append(nn.functional.cross_entropy(flat, targets.flatten(), reduction="none"))
            kl.append(kl_divergence(logits["clean"], logits["sae"], reduction="none").flatten())
            kl_abl.append(kl_divergence(logits["clean"], logits["zero"], reduction="none").flatten())
    r = acc.result()
    means = [float(torch.cat(b).mean()) for b in (clean, spliced, ablated)]
    kl_sae, kl_zero = float(torch.cat(kl).mean()), float(torch.cat(kl_abl).mean())
    return {
        "l0": r.l0,
        "mse": r.squared_error,
        "explained_variance": r.explained_variance,
        "cossim": r.cosine_similarity,
        "l2_ratio": r.l2_ratio,
        "relative_reconstruction_bias": r.relative_reconstruction_bias,
        "ce_loss_score": ce_loss_recovered(clean=means[0], spliced=means[1], zero_ablated=means[2]),
        "kl_div_with_sae": kl_sae,
        "kl_div_score": (kl_zero - kl_sae) / kl_zero,
    }


def saelens_metrics(sae, lm) -> dict:
    from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    n = ROWS // CTX // BATCH
    sparse, _ = get_sparsity_and_variance_metrics(
        sae, lm, Store(), ActivationScaler(), n, True, True, True, True, BATCH, {}
    )
    down = get_downstream_reconstruction_metrics(sae, lm, Store(), ActivationScaler(), True, True, n, BATCH)
    keys = ("l0", "mse", "explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias")
    return {k: sparse[k] for k in keys} | {k: down[k] for k in ("ce_loss_score", "kl_div_with_sae", "kl_div_score")}


def main() -> None:
    import sae_lens
    from sae_lens import SAE

    torch.set_num_threads(1)
    planted = planted_features(64, 32, probability=0.05, seed=0)
    acts, _ = planted.sample(ROWS, torch.Generator().manual_seed(123))
    lm = tiny_model(acts)
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}; {ROWS} activations of width 32")
    tmp = Path(tempfile.mkdtemp())
    for name, kw in METHODS.items():
        cfg = DictionaryConfig(d_in=32, d_sae=128, normalize_activations="expected_average_only_in", **kw)
        tc = TrainConfig(lr=3e-3, progress=False, dead_window=256 * 50)
        model = train(cfg, planted.batches(800, 256, seed=1), tc).model.eval()
        save_saelens(model, tmp / name, hook_name=HOOK, hook_layer=0, model_name="tiny", context_size=CTX)
        sae = SAE.load_from_disk(str(tmp / name))
        with torch.no_grad():
            ours_out, ours_f = model(acts)
            theirs_f = sae.encode(acts)
            theirs_out = sae.decode(theirs_f)
        print(f"\n{name}: SAELens class {type(sae).__name__}, architecture {sae.cfg.architecture()}")
        print(
            f"  forward: max |latents diff| {float((ours_f - theirs_f).abs().max()):.2e}, "
            f"max |output diff| {float((ours_out - theirs_out).abs().max()):.2e}"
        )
        ours, theirs = ours_metrics(model, lm, acts), saelens_metrics(sae, lm)
        for key in ours:
            a, b = ours[key], theirs[key]
            print(f"  {key:30s} mechscope {a:+.6f}   SAELens {b:+.6f}   diff {a - b:+.1e}")
    for name, kw in {"skip_transcoder": dict(skip=True), "jumprelu_transcoder": dict(architecture="jumprelu")}.items():
        cfg = DictionaryConfig(d_in=32, d_sae=64, transcoder=True, d_out=16, **kw)
        model = train(
            cfg, [(x, x[:, :16] * 2) for x in planted.batches(50, 256, seed=2)], TrainConfig(lr=3e-3, progress=False)
        ).model.eval()
        with torch.no_grad():
            model.threshold.copy_(torch.linspace(0.0, 0.2, 64)) if cfg.uses_threshold else None
        save_saelens(model, tmp / name, hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
        sae = SAE.load_from_disk(str(tmp / name))
        with torch.no_grad():
            theirs = sae(acts)
            theirs = theirs[0] if isinstance(theirs, tuple) else theirs
            diff = float((model(acts).output - theirs).abs().max())
        print(f"\n{name}: SAELens class {type(sae).__name__}: max |output diff| {diff:.2e}")


if __name__ == "__main__":
    main()
