"""The language half's reports: figures, sentences and self-contained HTML pages, written from results (no
computation)."""
