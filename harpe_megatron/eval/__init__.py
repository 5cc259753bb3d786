"""Long-context evaluation of an exported model: perplexity by length, retrieval grids, reports.

``perplexity`` (sliding window, by length), ``synthetic`` (passkey, needle-in-a-haystack and the
RULER-style tasks), ``scoring``, ``runner`` (the length x depth grid over a loaded HF model),
``heatmap`` and ``report`` (comparison tables).
"""
