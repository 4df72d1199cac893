"""``mechscope lm graph``: attribution graphs through transcoder features."""
