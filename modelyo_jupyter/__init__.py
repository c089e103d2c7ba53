"""Modelyo in Jupyter (filled in by issue 6)."""
