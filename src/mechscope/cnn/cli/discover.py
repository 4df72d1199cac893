"""``mechscope cnn discover``: automatic circuit discovery on the component graph."""
