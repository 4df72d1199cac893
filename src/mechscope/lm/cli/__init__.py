"""``mechscope lm ...``: the language half's command group; each module registers its commands on it, in the
order ``--help`` lists them."""

from mechscope.lm.cli import models  # noqa: F401  (inspect, generate)

# isort: split
from mechscope.lm.cli import heads  # noqa: F401  (heads)

# isort: split
from mechscope.lm.cli import circuits, neurons, toy  # noqa: F401  (circuits, neurons, solu-compare, train-toy)

# isort: split
from mechscope.lm.cli import discover, graph, sae  # noqa: F401  (discover, graph, sae)
from mechscope.lm.cli.common import app

__all__ = ["app"]
