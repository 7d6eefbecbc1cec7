"""neurorecon.pipelines.evaluate: retrieval / identification metrics, the ridge baseline, figures.

- :mod:`.metrics` -- pure numpy functions: cosine similarity, top-k retrieval with median rank
  and chance levels, two-way identification, time-resolved (sliding-window) retrieval.
- :mod:`.ridge` -- :class:`~.ridge.RidgeDecoder`, the linear baseline (scikit-learn ``RidgeCV``).
- :mod:`.figures` -- PNG figures: retrieval examples, time-resolved curve, adaptation curve.
"""
