"""The language half's analyses: each computes and returns a frozen result; none prints, plots or writes files."""
