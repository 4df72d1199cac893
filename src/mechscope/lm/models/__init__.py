"""Transformers: one hookable implementation, the loaders and converters of every family, folding, devices."""
