"""Attribution graphs (Ameisen et al. 2025, "Circuit Tracing"): what both wings share.

A wing builds the local replacement model of its network on one input (sparse dictionaries in place of the layers
they replace, nonlinearities frozen at their values on the input, error nodes for what the dictionaries miss) and
adapts it to :class:`LinearSystem`; this package does the rest on tensors:

- :func:`build` (build.py): rows by backward Jacobians, the logits first, then the features in order of influence;
  sparse storage, so memory does not grow with the square of the number of active features.
- influence.py: normalised adjacency, influence, pruning and the replacement and completeness scores, on sparse
  triplets.
- :class:`AttributionGraph`, :class:`NodeInfo`, :func:`assemble`, :func:`load_graph` (graph.py): the result, its
  checked JSON (annotations included) and circuit-tracer's graph JSON; :class:`PhaseWork`, the passes a graph
  command made, by phase.
- :func:`propagate` (predict.py): what the graph predicts for an intervention; checks.py: edges against direct
  interventions (:func:`check_edges`), interventions against predictions (:func:`intervene`), the ones a command
  was asked for (:func:`asked_interventions`).
"""

from mechscope.core.attribution_graph.build import Built, LinearSystem, build
from mechscope.core.attribution_graph.checks import (
    GraphIntervention,
    asked_interventions,
    check_asked,
    check_counts,
    check_edges,
    check_graph_settings,
    intervene,
    parse_steer,
    predict,
)
from mechscope.core.attribution_graph.graph import (
    AttributionGraph,
    NodeInfo,
    PhaseWork,
    assemble,
    check_graph_record,
    load_graph,
    node_id,
)
from mechscope.core.attribution_graph.influence import Pruned, Triplets, graph_scores, influence, normalised, prune
from mechscope.core.attribution_graph.predict import propagate

__all__ = [
    "AttributionGraph",
    "Built",
    "GraphIntervention",
    "LinearSystem",
    "NodeInfo",
    "PhaseWork",
    "Pruned",
    "Triplets",
    "asked_interventions",
    "check_asked",
    "check_counts",
    "check_graph_settings",
    "parse_steer",
    "assemble",
    "build",
    "check_edges",
    "check_graph_record",
    "graph_scores",
    "influence",
    "intervene",
    "load_graph",
    "node_id",
    "normalised",
    "predict",
    "propagate",
    "prune",
]
