"""Reproductions of the source papers' experiments (run as ``python -m ncfast.experiments.<name>``)."""
