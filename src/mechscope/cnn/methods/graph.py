"""The channel graph of a conv stack: :class:`CNNEdges`, the :class:`~mechscope.core.graphs.EdgeModel` adapter of any
model :func:`~mechscope.cnn.models.spec.walk` reads.

Nodes: ``input`` (the image), every channel of every stage (``conv2.c7``, one input slot ``in``) and ``logits``
(slot ``in``). Edges run along the convolution and the read-out: ``input -> conv1.cj`` carries
``g_j · conv(x / std, W1[j])`` (every input channel; ``std`` the model's own input normalisation),
``conv{s-1}.ci -> conv{s}.cj`` carries ``g_j · conv(a_i, W[j, i])`` (``a_i`` the channel's output after its
activation and pooling, ``hook_out``; ``g_j`` the BatchNorm's scale in eval mode, 1 without one), and
``conv{S}.cj -> logits`` carries the read-out of channel j's block of the flattened output. A receiver's input
is the stage's ``hook_pre`` channel (the conv output, after a BatchNorm: an affine map of the sum of its edges),
or the logits; biases and the normalisation's shifts are constants. Everything runs through
:mod:`mechscope.core.hooks` on the model's own hook points; unedited, the logits are the model's.

A stage must act channel by channel after its convolution (BatchNorm2d in eval mode, element-wise activations,
pooling, dropout); a read-out must be linear (one ``Linear`` after the flatten). Anything else is refused in
one line: a hidden read-out layer mixes every channel non-linearly, so channels would not be the read-out's
inputs (explain such a model at its last stage with ``cnn explain`` instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mechscope.cnn.models.cnn import Normalize
from mechscope.cnn.models.spec import CNNSpec
from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import ComponentGraph, Node
from mechscope.core.hooks import hooks

CHANNELWISE_ACTS = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus,
                    nn.Mish, nn.Hardswish)  # fmt: skip


def check_supported(spec: CNNSpec) -> None:
    """Refuse, in one line, a model whose channels are not the nodes of a linear-edged graph."""
    if not spec.readout.linear:
        raise MechscopeError(
            "the channel graph needs a linear read-out (one Linear after the flatten); this model's read-out has a "
            f"hidden layer of {spec.readout.hidden} units, which mixes every channel non-linearly"
        )
    for stage in spec.stages:
        conv = stage.conv
        if conv.groups != 1:
            raise MechscopeError(f"{stage.name}: grouped convolutions (groups={conv.groups}) are not supported")
        for layer in stage.layers[1:]:
            m = layer.module
            ok = (
                layer.kind in ("identity", "pool", "hook")
                or (layer.kind == "act" and isinstance(m, CHANNELWISE_ACTS))
                or (layer.kind == "norm" and isinstance(m, nn.BatchNorm2d))
            )
            if not ok:
                raise MechscopeError(
                    f"{stage.name}: {layer.path} ({layer.type}) mixes channels or normalises each image: the "
                    "channel graph needs stages that act channel by channel (BatchNorm2d, element-wise "
                    "activations, pooling)"
                )


class CNNEdges:
    """The :class:`~mechscope.core.graphs.EdgeModel` of a conv stack (see the module docstring)."""

    def __init__(self, spec: CNNSpec) -> None:
        check_supported(spec)
        self.spec = spec
        self.model = spec.model
        nodes = [Node("input", "input", 0, 0)]
        edges = []
        prev = ["input"]
        for s, stage in enumerate(spec.stages, 1):
            names = [f"{stage.name}.c{j}" for j in range(stage.out_channels)]
            nodes += [Node(n, "channel", s, j, ("in",)) for j, n in enumerate(names)]
            edges += [(a, b, "in") for b in names for a in prev]
            prev = names
        nodes.append(Node("logits", "output", len(spec.stages) + 1, 0, ("in",), sends=False))
        edges += [(a, "logits", "in") for a in prev]
        self.graph = ComponentGraph(tuple(nodes), tuple(edges))
        g = self.graph
        self.s_input = g.sender_of(g.node_id("input"))
        self.s_stage = [[g.sender_of(g.node_id(f"{st.name}.c{j}")) for j in range(st.out_channels)]
                        for st in spec.stages]  # fmt: skip
        self.r_stage = [[g.receivers_of(g.node_id(f"{st.name}.c{j}"))[0] for j in range(st.out_channels)]
                        for st in spec.stages]  # fmt: skip
        self.r_logits = g.receivers_of(g.node_id("logits"))[0]
        self.stage_of_receiver = {r: (s, j) for s, rs in enumerate(self.r_stage) for j, r in enumerate(rs)}
        self.std = self._input_scale()
        self.forwards = 0

    def _input_scale(self) -> torch.Tensor | None:
        """1/std per input channel of a Normalize before the first convolution (None: the image as it is)."""
        first = self.spec.stages[0].conv
        for _, module in self.spec.plan:
            if module is first:
                return None
            if isinstance(module, Normalize):
                return module.std
            if not isinstance(module, (nn.Identity, nn.Dropout)) and any(True for _ in module.parameters()):
                raise MechscopeError(
                    f"a layer before the first convolution ({type(module).__name__}) is not a normalisation: the "
                    "graph's input node needs the image to enter the convolution as it is or normalised"
                )
        return None

    # ---- the protocol ---------------------------------------------------------------------------

    def forward(self, images, edit=None):
        senders: list[torch.Tensor | None] = [None] * self.graph.n_senders
        self.forwards += 1

        def keep_input(x, hook):
            senders[self.s_input] = x

        def split(s):
            def fn(x, hook):
                ins = list(x.unbind(1))
                if edit is not None:
                    ins = edit(self.r_stage[s], ins, senders)
                return torch.stack(ins, 1)

            return fn

        def channels(s):
            def fn(x, hook):
                for j, k in enumerate(self.s_stage[s]):
                    senders[k] = x[:, j]

            return fn

        def logits(x, hook):
            return x if edit is None else edit([self.r_logits], [x], senders)[0]

        fwd = [("hook_input", keep_input)]
        for s, stage in enumerate(self.spec.stages):
            fwd += [(stage.hook_pre, split(s)), (stage.hook_out, channels(s))]
        fwd.append(("hook_logits", logits))
        with hooks(self.model, fwd=fwd):
            out = self.model(images)
        return out, senders

    def edge_mix(self, values, weight, receivers):
        out: list[torch.Tensor | None] = []
        cache: dict[int, torch.Tensor | None] = {}
        for r in receivers:
            if r == self.r_logits:
                out.append(self._readout(values, weight))
                continue
            s, j = self.stage_of_receiver[r]
            if s not in cache:
                cache[s] = self._stage_mix(s, values, weight)
            out.append(None if cache[s] is None else cache[s][:, j])
        return out

    # ---- the edges' linear maps -----------------------------------------------------------------

    def _scale(self, s: int) -> torch.Tensor:
        """Per output channel of stage ``s``: the BatchNorm's multiplier (eval mode), or ones."""
        stage = self.spec.stages[s]
        bn = stage.first("norm")
        conv = stage.conv
        if bn is None:
            return torch.ones(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
        m = bn.module
        w = m.weight if m.weight is not None else torch.ones_like(m.running_var)
        return w / torch.sqrt(m.running_var + m.eps)

    def _stage_mix(self, s: int, values, weight) -> torch.Tensor | None:
        g = self.graph
        stage = self.spec.stages[s]
        conv = stage.conv
        if s == 0:
            v = values[self.s_input]
            if v is None:
                return None
            if self.std is not None:
                v = v / self.std.to(v.device, v.dtype).view(-1, 1, 1)
            w_edges = torch.stack([weight[g.edge_id("input", f"{stage.name}.c{j}", "in")]
                                   for j in range(conv.out_channels)])  # fmt: skip
            W = conv.weight * (w_edges * self._scale(s)).to(conv.weight.dtype).view(-1, 1, 1, 1)
            return self._conv(conv, v, W)
        ins = self.s_stage[s - 1]
        present = [i for i, k in enumerate(ins) if values[k] is not None]
        if not present:
            return None
        vals = torch.broadcast_tensors(*[values[ins[i]] for i in present])
        x = torch.stack(vals, 1)  # [B, Cin', H, W]
        prev = self.spec.stages[s - 1].name
        eid = torch.tensor([[g.edge_id(f"{prev}.c{i}", f"{stage.name}.c{j}", "in") for i in present]
                            for j in range(conv.out_channels)], device=weight.device)  # fmt: skip
        W = conv.weight[:, present] * (weight[eid] * self._scale(s)[:, None]).to(conv.weight.dtype)[..., None, None]
        return self._conv(conv, x.to(W.dtype), W)

    @staticmethod
    def _conv(conv: nn.Conv2d, x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        if conv.padding_mode != "zeros":
            raise MechscopeError(f"convolutions with padding_mode={conv.padding_mode!r} are not supported")
        return F.conv2d(x, W, None, conv.stride, conv.padding, conv.dilation)

    def _readout(self, values, weight) -> torch.Tensor | None:
        g = self.graph
        last = self.spec.stages[-1]
        fc = self.spec.readout.fc
        c, h, w = self.spec.readout.in_shape
        block = h * w
        acc = None
        for j, k in enumerate(self.s_stage[-1]):
            v = values[k]
            if v is None:
                continue
            e = g.edge_id(f"{last.name}.c{j}", "logits", "in")
            part = fc.weight[:, j * block : (j + 1) * block]
            term = weight[e].to(fc.weight.dtype) * (v.flatten(1).to(fc.weight.dtype) @ part.T)
            acc = term if acc is None else acc + term
        return acc
