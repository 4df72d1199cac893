"""tracr's circuit.json files as ground truth: the four real files, and one-line errors for broken ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mechscope.core.errors import MechscopeError
from mechscope.core.graphs import EdgeScores, KnownCircuit, load_circuit, score_circuit

REPO = Path(__file__).resolve().parents[2]
# folder -> (components in the circuit, primary edges), from shared/data/tracr/README.md
EXPECTED = {"frac_prevs": (2, 5), "reverse": (5, 10), "hist": (2, 4), "length": (2, 4)}


def tracr_root() -> Path | None:
    for candidate in (os.environ.get("MECHSCOPE_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "tracr" / "reverse" / "circuit.json").exists():
            return Path(candidate) / "tracr"
    return None


@pytest.fixture(scope="module")
def root() -> Path:
    found = tracr_root()
    if found is None:
        pytest.skip("tracr circuit.json files not found in $MECHSCOPE_DATA or ../shared/data")
    return found


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_circuit_files_load_and_score(root, name):
    known = load_circuit(root / name)
    raw = json.loads((root / name / "circuit.json").read_text())
    assert (len(known.nodes), len(known.edge_set("primary"))) == EXPECTED[name]
    assert set(known.edge_sets) == {"primary", "functional", "all"}
    assert set(known.edge_set("all")) == set(known.edges)
    g = known.graph()
    assert [n.name for n in g.nodes] == raw["all_components"]
    # an oracle that scores every edge by its measured zero-ablation effect finds the functional set exactly
    scores = np.zeros(g.n_edges)
    for e in raw["edges"]:
        scores[g.edge_id(e["source"], e["target"], e["slot"])] = e["ablation_effect"]
    oracle = EdgeScores(method="ablation_effect", graph=g, scores=scores)
    functional = score_circuit(oracle, known, edge_set="functional")
    assert (functional.edge_precision, functional.edge_recall, functional.edge_auroc) == (1.0, 1.0, 1.0)
    assert functional.node_recall_at_size == 1.0
    primary = score_circuit(oracle, known)  # the sets differ where the README says they do
    assert primary.n_true_edges == EXPECTED[name][1] and 0.5 < primary.edge_auroc <= 1.0
    assert KnownCircuit.from_dict(json.loads(json.dumps(known.to_dict()))) == known


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "circuit.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _minimal() -> dict:
    return {
        "all_components": ["embed", "pos_embed", "blocks.0.attn.h0", "blocks.0.mlp", "unembed"],
        "circuit_components": ["blocks.0.attn.h0"],
        "edges": [
            {"source": "embed", "target": "blocks.0.attn.h0", "slot": "v"},
            {"source": "blocks.0.attn.h0", "target": "unembed", "slot": "out"},
        ],
        "edge_sets": {
            "primary": [["embed", "blocks.0.attn.h0", "v"], ["blocks.0.attn.h0", "unembed", "out"]],
            "note": "text",
        },
    }


def test_minimal_file_loads(tmp_path):
    known = load_circuit(_write(tmp_path, _minimal()))
    assert known.name == tmp_path.name and known.edge_set() == (
        ("embed", "blocks.0.attn.h0", "v"),
        ("blocks.0.attn.h0", "unembed", "out"),
    )
    with pytest.raises(MechscopeError, match="unknown edge set"):
        known.edge_set("functional")


def _broken(change):
    data = _minimal()
    change(data)
    return data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("{not json", "not a readable"),
        ("[1, 2]", "JSON object"),
        (_broken(lambda d: d.pop("edges")), "no 'edges'"),
        (_broken(lambda d: d.update(edges={})), "must be a list"),
        (_broken(lambda d: d["all_components"].append("blocks.0.attn.z")), "unknown component name"),
        (_broken(lambda d: d["all_components"].remove("blocks.0.mlp")), "not a full"),
        (_broken(lambda d: d["circuit_components"].append("blocks.3.mlp")), "not in all_components"),
        (
            _broken(lambda d: d["edges"].append({"source": "unembed", "target": "blocks.0.mlp", "slot": "in"})),
            "output node",
        ),
        (
            _broken(lambda d: d["edges"].append({"source": "blocks.0.mlp", "target": "blocks.0.attn.h0", "slot": "q"})),
            "not an edge",
        ),
        (
            _broken(lambda d: d["edges"].append({"source": "embed", "target": "blocks.0.mlp", "slot": "q"})),
            "not an edge",
        ),
        (_broken(lambda d: d["edges"].append({"source": "embed"})), "malformed edge"),
        (_broken(lambda d: d["edge_sets"]["primary"].append(["embed", "blocks.0.mlp", "in"])), "which edges lacks"),
        (_broken(lambda d: d["edge_sets"].pop("primary")), "no 'primary'"),
        (_broken(lambda d: d["edge_sets"].update(all=5)), "must be a list"),
    ],
)
def test_broken_files_raise_one_line(tmp_path, data, match):
    path = _write(tmp_path, data)
    with pytest.raises(MechscopeError, match=match) as e:
        load_circuit(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_missing_file_raises(tmp_path):
    with pytest.raises(MechscopeError, match="not found"):
        load_circuit(tmp_path / "nope.json")
    with pytest.raises(MechscopeError, match="circuit.json: not found"):
        load_circuit(tmp_path)
    with pytest.raises(MechscopeError, match="load_circuit takes a path .*not NoneType"):  # pathlib's TypeError
        load_circuit(None)


def test_a_smaller_models_circuit_is_refused(root):
    """hist's circuit (1 block, 1 head) names only components reverse (4 blocks) has too: every name resolved, so it
    was scored against reverse's edges without a word (node recall 0.0)."""
    hist, reverse = load_circuit(root / "hist"), load_circuit(root / "reverse")
    scores = EdgeScores(method="eap", graph=reverse.graph(), scores=np.ones(reverse.graph().n_edges))
    with pytest.raises(MechscopeError, match="the known circuit 'hist' is of another model .* 1 block"):
        score_circuit(scores, hist)
    assert score_circuit(scores, reverse).n_true_edges == len(reverse.edge_set("primary"))
