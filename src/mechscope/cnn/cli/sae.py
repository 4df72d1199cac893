"""``mechscope cnn sae ...``: sparse dictionaries (harvest, train, evaluate, show)."""
