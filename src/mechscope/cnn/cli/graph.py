"""``mechscope cnn graph``: attribution graphs through transcoder features."""
