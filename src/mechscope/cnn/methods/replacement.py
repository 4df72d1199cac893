"""The local replacement model of mechscope's CNN on one image: the attribution-graph construction of Ameisen et
al. (2025) carried over to a conv stack.

One sparse dictionary per stage replaces an activation at every position of that stage's map (a channel vector):

* ``sae`` (default): an SAE on ``conv{i}.hook_out`` (after ReLU and pooling): the stage's output becomes
  ``Σ_j a_j W_dec[j] + b_dec + ε``;
* ``transcoder``: a channel transcoder from ``conv{i}.hook_pre`` to ``conv{i}.hook_post``, replacing the ReLU;
* ``channels``: each stage's own channels as an exact transcoder across its ReLU (``W_enc = W_dec = I``): every
  error node is zero, the features are the CNN's channels (a baseline, and a known answer).

Everything else is frozen at its value on the image: each ReLU's mask (which units were positive), each max-pool's
choice (which input won each window), the hidden layer's ReLU; convolutions, batch norms (in eval mode), average
pools, the input normalisation and the read-out are linear already. The network is then linear in its sources:
pixels (the normalised input, one node per pixel, channels summed), features (stage, position, index) and error
vectors (stage, position), and every edge is a backward pass's gradient times a source, exactly as for a
transformer (:mod:`mechscope.core.attribution_graph`). Positions are ``y * width + x`` in the stage's own map; the
receptive field of a position (Araujo et al. 2019) gives its centre in pixels.

The logit attributed is one class's logit minus the mean logit (softmax ignores a shift), the predicted class by
default.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.cnn.models.cnn import CNN, Normalize
from mechscope.core.dictionaries import DictionaryConfig, SparseDictionary, load_saelens, save_saelens
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import hooks, module_hooks

KINDS = {
    "sae": ("hook_out", "hook_out"),
    "transcoder": ("hook_pre", "hook_post"),
    "channels": ("hook_pre", "hook_post"),
}
MODES = ("direct", "frozen", "recomputed", "model")


def check_model(model) -> CNN:
    if not isinstance(model, CNN):
        raise MechscopeError(f"attribution graphs need mechscope's CNN, got {type(model).__name__}")
    c = model.config
    if c.activation != "relu":
        raise MechscopeError(
            f"attribution graphs freeze ReLU masks; this CNN uses {c.activation} (train one with --activation relu)"
        )
    return model


@dataclass(frozen=True)
class StageDictionaries:
    """One dictionary per conv stage (folded to raw units), of one ``kind`` (sae, transcoder, channels)."""

    kind: str
    layers: tuple[SparseDictionary, ...]
    source: str = ""
    paths: tuple[str, ...] = ()

    def hooks(self, stage: int) -> tuple[str, str]:
        a, b = KINDS[self.kind]
        return f"conv{stage + 1}.{a}", f"conv{stage + 1}.{b}"

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        return [d.cfg.d_sae for d in self.layers]

    def check(self, model: CNN) -> None:
        chans = model.config.channels
        if len(self.layers) != len(chans):
            raise MechscopeError(
                f"{len(self.layers)} dictionaries for a CNN of {len(chans)} stages: give one per stage"
            )
        for i, (d, c) in enumerate(zip(self.layers, chans, strict=True)):
            if d.cfg.d_in != c or d.cfg.d_out != c:
                raise MechscopeError(
                    f"the dictionary of stage conv{i + 1} maps {d.cfg.d_in} -> {d.cfg.d_out} channels; "
                    f"the stage has {c}"
                )

    @classmethod
    def channels(cls, model: CNN) -> StageDictionaries:
        """Each stage's channels as an exact transcoder across its ReLU."""
        out = []
        for c in model.config.channels:
            d = SparseDictionary.blank(DictionaryConfig(d_in=c, d_sae=c, architecture="relu", transcoder=True, d_out=c))
            with torch.no_grad():
                d.W_enc.copy_(torch.eye(c))
                d.W_dec.copy_(torch.eye(c))
                d.b_enc.zero_()
                d.b_dec.zero_()
            out.append(d.eval())
        return cls("channels", tuple(out), "the CNN's channels")

    @classmethod
    def of(cls, kind: str, dictionaries, source: str = "given") -> StageDictionaries:
        if kind not in KINDS:
            raise MechscopeError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(kind, tuple(d.folded().eval() for d in dictionaries), source)

    def save(self, path, run: str = "") -> Path:
        root = Path(path)
        for i, d in enumerate(self.layers):
            a, b = self.hooks(i)
            save_saelens(
                d,
                root / f"conv{i + 1}",
                hook_name=a,
                hook_layer=i,
                model_name=run,
                hook_name_out=b if d.cfg.transcoder else None,
                hook_layer_out=i,
            )
        return root

    @classmethod
    def load(cls, path) -> StageDictionaries:
        """A folder with one SAELens-layout dictionary per stage (``cfg.json`` naming ``conv{i}.hook_out`` for an SAE
        or ``conv{i}.hook_pre`` -> ``conv{i}.hook_post`` for a transcoder)."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise MechscopeError(f"{root}: dictionary folder not found")
        dirs = (
            [root] if (root / "cfg.json").is_file() else sorted(p for p in root.iterdir() if (p / "cfg.json").is_file())
        )
        if not dirs:
            raise MechscopeError(f"{root}: no dictionary (no cfg.json in it or in its sub-folders)")
        found: dict[int, tuple[SparseDictionary, str, str]] = {}
        for d in dirs:
            loaded = load_saelens(d)
            hook = loaded.metadata.get("hook_name") or ""
            m = re.fullmatch(r"conv(\d+)\.(hook_out|hook_pre)", hook)
            if not m:
                raise MechscopeError(
                    f"{d}: reads {hook!r}; expected conv<i>.hook_out (SAE) or conv<i>.hook_pre "
                    "(transcoder to conv<i>.hook_post)"
                )
            stage = int(m.group(1)) - 1
            kind, reads = ("transcoder", "hook_pre") if loaded.model.cfg.transcoder else ("sae", "hook_out")
            if m.group(2) != reads:
                raise MechscopeError(f"{d}: {'a transcoder' if kind == 'transcoder' else 'an SAE'} reads "
                                     f"conv{stage + 1}.{reads}, not {hook}")  # fmt: skip
            if kind == "transcoder" and (loaded.metadata.get("hook_name_out") or "") != f"conv{stage + 1}.hook_post":
                raise MechscopeError(f"{d}: a transcoder must write conv{stage + 1}.hook_post")
            if stage in found:
                raise MechscopeError(f"{d}: a second dictionary for stage conv{stage + 1}")
            found[stage] = (loaded.model.folded().eval(), kind, str(d))
        kinds = {k for _, k, _ in found.values()}
        if len(kinds) > 1:
            raise MechscopeError(f"{root}: mixes SAEs and transcoders; give one kind for every stage")
        missing = [i for i in range(max(found) + 1) if i not in found]
        if missing:
            raise MechscopeError(f"{root}: no dictionary for stage conv{missing[0] + 1}")
        order = sorted(found)
        return cls(kinds.pop(), tuple(found[i][0] for i in order), str(root), tuple(found[i][2] for i in order))


def receptive_centres(model: CNN, kind: str) -> list[tuple[float, float, int]]:
    """(first centre, jump, width) in input pixels of each stage's dictionary grid."""
    c = model.config
    start, jump, out = 0.0, 1.0, []
    size = c.image_size
    for _ in c.channels:
        start += ((c.kernel_size - 1) / 2 - c.padding) * jump
        size = size + 2 * c.padding - c.kernel_size + 1
        if kind == "sae" and c.pool > 1:
            start += (c.pool - 1) / 2 * jump
            jump *= c.pool
            size //= c.pool
            out.append((start, jump, size))
        else:
            out.append((start, jump, size))
            if c.pool > 1:
                start += (c.pool - 1) / 2 * jump
                jump *= c.pool
                size //= c.pool
    return out


@dataclass
class _Pass:
    batch: int
    x0: torch.Tensor  # [B,C,H,W] the normalised image (a leaf)
    sites: list[torch.Tensor]  # per stage [B,C,h,w] zero leaves added to the dictionary's output
    inputs: dict[int, torch.Tensor]  # per stage [B,C,h,w] the dictionary's input
    logits: torch.Tensor  # [B,K]


class CnnReplacement:
    """The local replacement model of ``model`` on ``image`` [C,H,W] with ``dictionaries`` (see the module
    docstring). Attributes: ``feature_layer/pos/index/activation`` [N], ``errors`` per stage [C,h,w],
    ``logits`` [K] (the model's own)."""

    def __init__(self, model: CNN, dictionaries: StageDictionaries, image: torch.Tensor, batch_size: int = 32) -> None:
        self.model = check_model(model)
        if not isinstance(dictionaries, StageDictionaries):
            raise MechscopeError(f"expected StageDictionaries, got {type(dictionaries).__name__}")
        dictionaries.check(model)
        image = torch.as_tensor(image).float()
        image = image[None] if image.dim() == 3 else image
        model.check_input(image)
        if image.shape[0] != 1:
            raise MechscopeError(f"expected one image, got a batch of {image.shape[0]}")
        self.dicts = dictionaries
        self.image = image
        self.L = len(dictionaries)
        self.batch_size = max(1, int(batch_size))
        self._pass: _Pass | None = None
        self._clean()

    # ---- clean run ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _clean(self) -> None:
        self.masks: dict[int, torch.Tensor] = {}
        self.pool_idx: dict[int, torch.Tensor] = {}
        ins, outs = {}, {}

        def relu_hook(module, args, output):
            self.masks[id(module)] = args[0] > 0

        def pool_hook(module, args, output):
            _, idx = F.max_pool2d(
                args[0],
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.ceil_mode,
                return_indices=True,
            )
            self.pool_idx[id(module)] = idx

        def store(d, i):
            def fn(x, hook):
                d[i] = x.detach()

            return fn

        fwd = [(self.dicts.hooks(i)[0], store(ins, i)) for i in range(self.L)]
        fwd += [(self.dicts.hooks(i)[1], store(outs, i)) for i in range(self.L)]
        with ExitStack() as st:
            st.enter_context(module_hooks(self.model, (nn.ReLU,), forward=relu_hook))
            st.enter_context(module_hooks(self.model, (nn.MaxPool2d,), forward=pool_hook))
            st.enter_context(hooks(self.model, fwd=fwd))
            self.logits = self.model(self.image)[0].float()
        self.x_norm = self.model.normalize(self.image)[0]  # [C,H,W]
        self.acts, self.errors, self.grid = {}, {}, []
        layers, pos, idx, act = [], [], [], []
        for i, d in enumerate(self.dicts.layers):
            x = ins[i][0]  # [C,h,w]
            C, h, w = x.shape
            self.grid.append((h, w))
            rows = x.permute(1, 2, 0).reshape(-1, C)  # [h*w, C]
            f = d.encode(rows)  # [h*w, d_sae]
            self.acts[i] = f
            rec = self._decode(i, f, rows)  # [h*w, C]
            self.errors[i] = outs[i][0].permute(1, 2, 0).reshape(-1, C) - rec  # [h*w, C]
            nz = f.nonzero()
            layers.append(torch.full((len(nz),), i, dtype=torch.long))
            pos.append(nz[:, 0])
            idx.append(nz[:, 1])
            act.append(f[nz[:, 0], nz[:, 1]].float())
        self.inputs_clean = ins
        self.feature_layer = torch.cat(layers)
        self.feature_pos = torch.cat(pos)
        self.feature_index = torch.cat(idx)
        self.feature_activation = torch.cat(act)
        self.layer_start = [int((self.feature_layer < i).sum()) for i in range(self.L + 1)]
        self.n_features = len(self.feature_layer)
        self.error_start = [0]
        for h, w in self.grid:
            self.error_start.append(self.error_start[-1] + h * w)
        self.n_errors = self.error_start[-1]
        _, H, W = self.x_norm.shape
        self.n_inputs = H * W

    def _decode(self, i: int, f: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        d = self.dicts.layers[i]
        out = f @ d.W_dec + d.b_dec
        return out + rows @ d.W_skip.T if d.cfg.skip else out

    # ---- frozen runs -----------------------------------------------------------------------------------

    @contextmanager
    def frozen(self) -> Iterator[None]:
        def relu_hook(module, args, output):
            m = self.masks.get(id(module))
            return None if m is None else args[0] * m

        def pool_hook(module, args, output):
            idx = self.pool_idx.get(id(module))
            if idx is None:
                return None
            x = args[0]
            B = x.shape[0]
            flat = x.flatten(2)
            got = flat.gather(2, idx.flatten(2).expand(B, -1, -1))
            return got.view(B, *idx.shape[1:])

        with (
            module_hooks(self.model, (nn.ReLU,), forward=relu_hook),
            module_hooks(self.model, (nn.MaxPool2d,), forward=pool_hook),
        ):
            yield

    def _forward(self, x0: torch.Tensor, mode: str, values=None, error_delta=None, sites=None):
        """The logits [B,K] and the dictionaries' inputs from the normalised image ``x0`` [B,C,H,W] (modes as for a
        transformer: direct, frozen, recomputed, model)."""
        values = values or {}
        ins: dict[int, torch.Tensor] = {}

        def take(i):
            def fn(x, hook):
                ins[i] = x

            return fn

        def replace(i):
            def fn(out, hook):
                x = ins[i]
                B, C, h, w = x.shape
                rows = x.permute(0, 2, 3, 1).reshape(B, h * w, C)
                if mode == "model":
                    if i not in values:
                        return out
                    delta = (values[i] - self.acts[i]) @ self.dicts.layers[i].W_dec  # [h*w, C]
                    return out + delta.T.reshape(1, C, h, w)
                if mode == "direct":
                    f = values.get(i, self.acts[i]).expand(B, -1, -1)
                else:
                    f = self.dicts.layers[i].encode(rows)
                    if i in values:
                        f = torch.where(values[i] != self.acts[i], values[i], f)
                new = self._decode(i, f, rows) + self.errors[i]
                if error_delta is not None:
                    new = new + error_delta[i]
                new = new.reshape(B, h, w, C).permute(0, 3, 1, 2)
                return new + sites[i] if sites is not None else new

            return fn

        def norm_hook(module, args, output):
            return x0

        fwd = [(self.dicts.hooks(i)[0], take(i)) for i in range(self.L)]
        fwd += [(self.dicts.hooks(i)[1], replace(i)) for i in range(self.L)]
        with ExitStack() as st:
            if mode in ("direct", "frozen"):
                st.enter_context(self.frozen())
            st.enter_context(module_hooks(self.model, (Normalize,), forward=norm_hook))
            st.enter_context(hooks(self.model, fwd=fwd))
            logits = self.model(self.image.expand(x0.shape[0], -1, -1, -1))
        return logits, ins

    @torch.no_grad()
    def replacement_logits(self) -> torch.Tensor:
        return self._forward(self.x_norm[None], "direct")[0][0].float()

    def pre_activations(self, ins: dict[int, torch.Tensor]) -> torch.Tensor:
        out = []
        for i, d in enumerate(self.dicts.layers):
            s, e = self.layer_start[i], self.layer_start[i + 1]
            if e > s:
                x = ins[i][0]
                rows = x.permute(1, 2, 0).reshape(-1, x.shape[0])
                z = d.pre_activations(rows)
                out.append(z[self.feature_pos[s:e], self.feature_index[s:e]].float())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def run(
        self,
        mode: str = "direct",
        features: dict[int, float] | None = None,
        scale_source: tuple[int, float] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [K], pre-activations of the active features [N]) after changing features or scaling a source."""
        if mode not in MODES:
            raise MechscopeError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        values = {i: a.clone() for i, a in self.acts.items()}
        x0 = self.x_norm[None].clone()
        err = None
        changes = dict(features or {})
        if scale_source is not None:
            s, factor = scale_source
            nf, ne = self.n_features, self.n_errors
            if s < nf:
                changes[s] = float(self.feature_activation[s]) * factor
            elif s < nf + ne:
                layer = max(i for i in range(self.L) if self.error_start[i] <= s - nf)
                p = s - nf - self.error_start[layer]
                err = {i: torch.zeros_like(self.errors[i]) for i in range(self.L)}
                err[layer][p] = self.errors[layer][p] * (factor - 1)
            else:
                p = s - nf - ne
                W = self.x_norm.shape[2]
                x0[0, :, p // W, p % W] *= factor
        touched = set()
        for s, v in changes.items():
            if not 0 <= s < self.n_features:
                raise MechscopeError(f"source {s} is not an active feature (0..{self.n_features - 1})")
            layer = int(self.feature_layer[s])
            values[layer][self.feature_pos[s], self.feature_index[s]] = float(v)
            touched.add(layer)
        if mode != "direct":
            values = {i: values[i] for i in touched}
        logits, ins = self._forward(x0, mode, values, err)
        return logits[0].float(), self.pre_activations({i: v[:1] for i, v in ins.items()})

    # ---- rows by backward passes -------------------------------------------------------------------------

    def _ensure_pass(self) -> _Pass:
        if self._pass is not None:
            return self._pass
        B = self.batch_size
        x0 = self.x_norm.detach()[None].expand(B, -1, -1, -1).clone().requires_grad_(True)
        sites = []
        for i, (h, w) in enumerate(self.grid):
            C = self.model.config.channels[i]
            sites.append(torch.zeros(B, C, h, w, requires_grad=True))
        with torch.enable_grad():
            logits, ins = self._forward(x0, "direct", sites=sites)
        self._pass = _Pass(B, x0, sites, ins, logits)
        return self._pass

    def release(self) -> None:
        self._pass = None

    def backward_rows(self, inject, b: int) -> torch.Tensor:
        ps = self._ensure_pass()
        got = torch.autograd.grad(
            [t for t, _ in inject], [ps.x0, *ps.sites], [g for _, g in inject], retain_graph=True, allow_unused=True
        )
        return self.contract(got[0], got[1:], b)

    @torch.no_grad()
    def contract(self, gx0, gsites, b: int) -> torch.Tensor:
        nf, ne, nt = self.n_features, self.n_errors, self.n_inputs
        rows = torch.zeros(b, nf + ne + nt)
        for i in range(self.L):
            g = gsites[i]
            if g is None:
                continue
            B, C, h, w = g.shape
            g = g[:b].permute(0, 2, 3, 1).reshape(b, h * w, C)
            s, e = self.layer_start[i], self.layer_start[i + 1]
            if e > s:
                proj = g @ self.dicts.layers[i].W_dec.T  # [b, h*w, d_sae]
                rows[:, s:e] = proj[:, self.feature_pos[s:e], self.feature_index[s:e]] * self.feature_activation[s:e]
            rows[:, nf + self.error_start[i] : nf + self.error_start[i + 1]] = (g * self.errors[i]).sum(-1)
        if gx0 is not None:
            rows[:, nf + ne :] = (gx0[:b] * self.x_norm).sum(1).flatten(1)
        return rows

    def feature_rows(self, idx: torch.Tensor) -> torch.Tensor:
        ps = self._ensure_pass()
        layers = self.feature_layer[idx]
        inject = []
        for layer in layers.unique().tolist():
            x = ps.inputs[layer]
            g = torch.zeros_like(x)
            rows = (layers == layer).nonzero().squeeze(1)
            f = idx[rows]
            w = x.shape[3]
            p = self.feature_pos[f]
            enc = self.dicts.layers[layer].W_enc[:, self.feature_index[f]].T  # [n, C]
            g[rows, :, p // w, p % w] = enc
            inject.append((x, g))
        return self.backward_rows(inject, len(idx))

    def logit_rows(self, idx: torch.Tensor) -> torch.Tensor:
        ps = self._ensure_pass()
        g = torch.zeros_like(ps.logits)
        g[torch.arange(len(idx))] = self.logit_directions[idx]
        return self.backward_rows([(ps.logits, g)], len(idx))

    def set_targets(self, classes) -> None:
        classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
        K = self.model.config.n_classes
        if len(classes) == 0 or classes.min() < 0 or classes.max() >= K:
            raise MechscopeError(f"class {classes.tolist()} outside the model's 0..{K - 1}")
        self.logit_targets = classes
        eye = torch.eye(K)[classes]
        self.logit_directions = eye - 1.0 / K  # demeaned: logit_c - mean logit

    def demeaned(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits[targets] - logits.mean()

    # ---- names ---------------------------------------------------------------------------------------------

    def source_id(self, s: int) -> str:
        from mechscope.core.attribution_graph import node_id

        nf, ne = self.n_features, self.n_errors
        if s < nf:
            return node_id(
                "feature", int(self.feature_layer[s]), int(self.feature_index[s]), int(self.feature_pos[s]), 0
            )
        if s < nf + ne:
            layer = max(i for i in range(self.L) if self.error_start[i] <= s - nf)
            return node_id("error", layer, -1, s - nf - self.error_start[layer], 0)
        return node_id("input", -1, 0, s - nf - ne, 0)

    def source_of(self, node: str) -> int:
        m = re.fullmatch(r"(E|\d+)_(-?\d+)_(\d+)", node.strip())
        if not m:
            raise MechscopeError(f"expected a node id STAGE_FEATURE_POS (E_0_POS for a pixel), got {node!r}")
        a, b, c = m.group(1), int(m.group(2)), int(m.group(3))
        if a == "E":
            if b != 0:
                raise MechscopeError(f"node {node}: a pixel's id is E_0_POS")
            if not 0 <= c < self.n_inputs:
                raise MechscopeError(f"node {node}: pixel {c} outside 0..{self.n_inputs - 1}")
            return self.n_features + self.n_errors + c
        layer = int(a)
        if not 0 <= layer < self.L:
            raise MechscopeError(f"node {node}: stage {layer} outside 0..{self.L - 1}")
        h, w = self.grid[layer]
        if not 0 <= c < h * w:
            raise MechscopeError(f"node {node}: position {c} outside stage {layer}'s 0..{h * w - 1}")
        if b == -1:
            return self.n_features + self.error_start[layer] + c
        s, e = self.layer_start[layer], self.layer_start[layer + 1]
        hit = ((self.feature_pos[s:e] == c) & (self.feature_index[s:e] == b)).nonzero()
        if not len(hit):
            raise MechscopeError(f"node {node}: feature {b} of stage {layer} is not active at position {c}")
        return s + int(hit[0, 0])
