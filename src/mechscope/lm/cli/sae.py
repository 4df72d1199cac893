"""``mechscope lm sae ...``: sparse dictionaries (harvest, train, evaluate, show)."""
