"""mechscope's version, held in ``core`` so that what a record says made it (``core.outputs.versions``) needs
nothing outside ``core``; ``mechscope.__version__`` is this, and pyproject.toml gives the same."""

VERSION = "0.1.0"
