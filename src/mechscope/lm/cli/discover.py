"""``mechscope lm discover``: automatic circuit discovery on the component graph."""
