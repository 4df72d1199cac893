"""The component graph: numbering, topological order, names, JSON, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import ComponentGraph, Node, transformer_graph
from tests.graphs.toys import planted_conv, planted_residual


def test_dense_residual_graph_counts_and_order():
    g = planted_residual().graph
    assert (len(g.nodes), g.n_senders, g.n_receivers, g.n_edges) == (8, 7, 13, 43)
    rank = {n: i for i, n in enumerate(g.topological_order)}
    send, recv = g.edge_nodes()
    assert all(rank[a] < rank[b] for a, b in zip(send, recv, strict=True))
    assert [g.nodes[i].name for i in g.input_nodes()] == ["embed"]
    assert [g.nodes[i].name for i in g.output_nodes()] == ["logits"]
    assert g.edge_name(g.edge_id("embed", "blocks.2.h0", "k")) == "embed->blocks.2.h0<k>"
    assert g.receiver_name(g.receivers_of(g.node_id("blocks.1.h1"))[1]) == "blocks.1.h1<k>"


def test_transformer_graph_matches_the_standard_eap_graph():
    g = transformer_graph(1, 1)
    assert [n.name for n in g.nodes] == ["embed", "pos_embed", "blocks.0.attn.h0", "blocks.0.mlp", "unembed"]
    assert g.n_edges == 13  # embed, pos_embed -> q,k,v,in,out (10); head -> in, out (2); mlp -> out (1)
    # GPT-2 small with one input node: the 32,491 edges of Conmy et al. / Hanna et al.'s graph
    assert transformer_graph(12, 12, pos_embed=False).n_edges == 32491
    big = transformer_graph(12, 12)
    assert (big.n_senders, big.n_receivers, big.n_edges) == (158, 445, 32491 + 445)
    with pytest.raises(MechscopeError, match="n_layers"):
        transformer_graph(0, 1)


def test_conv_graph_is_not_dense():
    g = planted_conv().graph
    assert g.n_edges == 11
    assert g.parse_edge("conv1.c2->conv2.c1") == (g.edge_id("conv1.c2", "conv2.c1", "in"),)


def test_round_trip_through_json():
    g = planted_residual().graph
    back = ComponentGraph.from_dict(json.loads(json.dumps(g.to_dict())))
    assert back == g and back.topological_order == g.topological_order
    np.testing.assert_array_equal(back.edge_sender, g.edge_sender)
    assert g.to_dict()["schema"] == "mechscope.component_graph/1"
    assert g.to_dict()["edges"][0] == ["embed", "blocks.0.h0", "q"]


def test_parse_edge_forms():
    g = planted_residual().graph
    both = g.parse_edge("embed->blocks.0.h0")
    assert len(both) == 2
    assert g.parse_edge(["embed", "blocks.0.h0", "k"]) == g.parse_edge("embed->blocks.0.h0<k>")
    assert g.parse_edge(["embed", "blocks.0.h0<q>"]) == (g.edge_id("embed", "blocks.0.h0", "q"),)


NODES = (Node("a", "input", 0), Node("b", layer=1, slots=("in",)), Node("c", layer=2, slots=("in",), sends=False))


@pytest.mark.parametrize(
    ("nodes", "edges", "match"),
    [
        (NODES + (Node("d", layer=1, slots=("in",)),), [("b", "d", "in"), ("d", "b", "in")], "cycle"),
        (NODES, [("b", "b", "in")], "itself"),
        (NODES, [("c", "b", "in")], "output node"),
        (NODES, [("a", "b", "out")], "no input slot"),
        (NODES, [("a", "zz", "in")], "not a node"),
        (NODES, [("a", "b", "in"), ("a", "b", "in")], "twice"),
        (NODES, [("a", "b")], "malformed"),
        (NODES + (Node("a"),), [], "appears twice"),
        ((Node("x->y"),), [], "bad node name"),
        ((Node("x", slots=("in", "in")),), [], "slot twice"),
        ((Node("x", layer=1.5),), [], "integers"),
    ],
)
def test_bad_graphs_raise_one_line(nodes, edges, match):
    with pytest.raises(MechscopeError, match=match) as e:
        ComponentGraph(tuple(nodes), tuple(edges))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("nope->logits", "unknown component"),
        ("blocks.2.h0->blocks.0.h0", "no edge"),
        ("embed->blocks.0.h0<v>", "no input slot"),
        (42, "malformed"),
        (["embed"], "malformed"),
    ],
)
def test_bad_edge_names_raise(spec, match):
    with pytest.raises(MechscopeError, match=match):
        planted_residual().graph.parse_edge(spec)
