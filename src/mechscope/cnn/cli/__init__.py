"""``mechscope cnn ...`` (alias ``mechscope mnist``): the CNN half's command group; each module registers its
commands on it, in the order ``--help`` lists them."""

from mechscope.cnn.cli import commands  # noqa: F401  (train, evaluate, attribute, visualize, explain)

# isort: split
from mechscope.cnn.cli import blocks, solu, tuning, universality  # noqa: F401  (blocks, solu-compare, tuning, ...)

# isort: split
from mechscope.cnn.cli import discover, graph, sae  # noqa: F401  (discover, graph, sae)
from mechscope.cnn.cli.common import app

__all__ = ["app"]
