"""Pipelines of the language half: each strings steps together and returns ``(Path, Result)``."""
