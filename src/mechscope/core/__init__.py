"""The shared core: what both wings (``mechscope.cnn`` and ``mechscope.lm``) build on.

``core`` imports only ``core``. It holds the errors, input validation, hooks, the one intervention
mechanism, typed results and their renderer registry, atomic outputs, rendering primitives, torch
utilities, and the techniques both wings use (sparse dictionaries, circuit discovery, causal scrubbing),
written against tensors and small protocols that each wing adapts.
"""
