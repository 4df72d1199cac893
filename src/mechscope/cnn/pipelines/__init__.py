"""The CNN half's pipelines: the only place that strings steps together (data -> model -> methods -> outputs).

One module per command (``train``, ``attribute``, ``visualize``, ``explain``, ``blocks``, ``tuning``,
``universality``, ``solu_cnn``), each with a ``*_model`` function for a model and dataset in hand (the Python
API) and a ``*_run`` function for a run directory (the CLI); every one returns ``(Path, Result)``.
"""
