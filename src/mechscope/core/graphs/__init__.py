"""Circuit discovery on a component graph: EAP, EAP-IG, ACDC, faithfulness curves and ground-truth scoring.

Everything here works on a :class:`ComponentGraph` and a model that implements the small :class:`EdgeModel`
protocol; nothing imports CNN- or transformer-specific code. Each wing writes an adapter.

The graph
---------
Nodes are components; a node *sends* its output and *receives* on named input slots. An edge
``sender -> node<slot>`` says the receiver's input is a sum over its edges of a linear map ``c_e`` of the
sender's output, plus constants: removing the edge means ``in_r <- in_r - c_e(out_s - out'_s)``, with ``out'_s``
the sender's output on a corrupted input (``ablation="patch"``), its batch mean (``"mean"``) or zero (``"zero"``).

* Transformers (Conmy et al. 2023; Syed et al. 2023; Hanna et al. 2024), :func:`transformer_graph`: senders
  ``embed``, ``pos_embed``, every head ``blocks.L.attn.hH`` (its ``z @ W_O`` output) and every ``blocks.L.mlp``;
  receivers each head's ``q``, ``k`` and ``v`` inputs (three per head), each MLP's ``in`` and ``unembed<out>``
  (the logits). Every sender feeds every later receiver through the residual stream, ``c_e`` = identity: the
  adapter builds each receiver's input as its own tensor (e.g. the sum of its senders' outputs, before any
  LayerNorm) and returns :func:`residual_edge_mix` from ``edge_mix``.
* CNNs: nodes ``input`` (the image), every channel of every conv stage (``conv2.c7``, slot ``in``) and the
  logits; edge ``conv1.c3 -> conv2.c7<in>`` carries ``conv(a_3, W[7, 3])`` into channel 7's pre-activation, and
  ``convN.cj -> logits<in>`` the read-out of channel j. ``edge_mix`` is a convolution with ``W * weight[j, i]``
  (and the read-out restricted to the channels' blocks).

The protocol (:class:`EdgeModel`)
---------------------------------
``graph``; ``forward(inputs, edit=None) -> (output, senders)`` with ``senders`` one tensor per sender (batch
first), calling ``ins = edit(receiver_ids, ins, senders_so_far)`` before it uses any receiver's input; and
``edge_mix(values, weight, receivers)``: per receiver, ``sum over edges e = s->r of weight[e] * c_e(values[s])``.
Optionally ``interpolate(clean, corrupted, alpha)`` for EAP-IG, and ``edge_attribution(values, grads)``, the
adjoint of ``edge_mix`` (residual streams: :func:`residual_edge_attribution`, one matrix product). With these the
core runs every edge intervention itself (:mod:`.protocol`): removing edges is a patch term with weight 1 on them,
and edge attributions are the senders' differences times the gradients with respect to the receivers' inputs
(the gradients of the patch weights at 0), so adapters never write backward hooks.

Grouped-query attention: a key/value receiver is per key/value head; it belongs to the group's first head and the
others *read* it (``Node.reads``); ACDC's pruning of dead nodes and scrubbing's treeification follow reads.

Methods
-------
:func:`eap` (2 forwards, 1 backward), :func:`eap_ig`, :func:`edge_patching` (exact, one forward per edge) and
:func:`acdc` return :class:`EdgeScores` (``circuit(k or fraction)`` cuts a :class:`Circuit`);
:func:`faithfulness_curve` gives the MIB CPR/CMD and a random baseline; :func:`score_circuit` scores against a
known circuit, e.g. tracr's ``circuit.json`` via :func:`load_circuit`. :func:`find_circuit` strings them together
for both wings' ``discover`` (score, cut, curve, the drawn circuit alone). Causal scrubbing lives in
:mod:`mechscope.core.scrub`. A metric is any callable on the model's output returning a scalar tensor.
"""

from mechscope.core.graphs.acdc import acdc
from mechscope.core.graphs.attribution import eap, eap_ig, edge_patching
from mechscope.core.graphs.discovery import DEFAULT_SIZE, CircuitSearch, check_task_model, cut_circuit, find_circuit
from mechscope.core.graphs.faithfulness import (
    MIB_FRACTIONS,
    FaithfulnessCurve,
    circuit_faithfulness,
    faithfulness_curve,
    mib_areas,
)
from mechscope.core.graphs.graph import ComponentGraph, Node, transformer_graph
from mechscope.core.graphs.ground_truth import KnownCircuit, check_known, load_circuit
from mechscope.core.graphs.protocol import (
    EdgeModel,
    Term,
    capture,
    edge_attribution,
    gradients,
    receiver_gradients,
    residual_edge_attribution,
    residual_edge_mix,
    run,
)
from mechscope.core.graphs.results import (
    METHODS,
    Circuit,
    EdgeScores,
    TopEdges,
    check_discovery_counts,
    check_discovery_settings,
    check_method,
    check_threshold,
    parse_size,
)
from mechscope.core.graphs.scoring import CircuitScore, auroc, drawn_against_truth, score_circuit

__all__ = [
    "DEFAULT_SIZE",
    "CircuitSearch",
    "check_known",
    "check_task_model",
    "cut_circuit",
    "find_circuit",
    "METHODS",
    "MIB_FRACTIONS",
    "Circuit",
    "CircuitScore",
    "ComponentGraph",
    "EdgeModel",
    "EdgeScores",
    "FaithfulnessCurve",
    "KnownCircuit",
    "Node",
    "Term",
    "acdc",
    "auroc",
    "capture",
    "circuit_faithfulness",
    "drawn_against_truth",
    "eap",
    "eap_ig",
    "edge_attribution",
    "edge_patching",
    "faithfulness_curve",
    "gradients",
    "load_circuit",
    "mib_areas",
    "receiver_gradients",
    "residual_edge_attribution",
    "residual_edge_mix",
    "run",
    "score_circuit",
    "transformer_graph",
    "TopEdges",
    "check_discovery_counts",
    "check_discovery_settings",
    "check_method",
    "check_threshold",
    "parse_size",
]
