"""Reproductions of the source papers' experiments, one driver per paper:

- ``python -m ncfast.experiments.coarse``: paper 000, fine-grained structure under coarse labels
  (class-distance lines, CLP / LPO / OT, t-SNE per super-class, --fine, --grid);
- ``python -m ncfast.experiments.gmm``: paper 000 appendix B, MSDR in a Gaussian mixture;
- ``python -m ncfast.experiments.rank_collapse``: paper 002, rank collapse and the initial logits norm;
- ``python -m ncfast.experiments.ncc_layers``: paper 003, NCC mismatch per layer, TPT and SVSL;
- ``python -m ncfast.experiments.vci``: paper 004, the Variability Collapse Index beside fuzziness,
  squared distance and cosine separation.

Each writes ``runs/<name>/`` (``--out``): ``report.md`` (the paper's claims, its numbers, ours and a
verdict computed from our data), ``results.json`` and figures; ``--preset`` picks the data and sizes
(``digits`` by default), ``--quick`` is a smoke run for the tests.
"""
