"""Helpers of ``benchmarks/scale.py``: MoLE-Flow's cost as the continual stream grows.

``settings``: what the benchmark runs (:class:`ScaleSettings`);
``measure``: the continual run over synthetic products and the measurements after each task;
``report``: the summary ratios and the markdown report ``scale.md``;
``plots``: the figure ``scale.png``.
"""
