"""Helpers of ``benchmarks/compare.py``: MoLE-Flow against anomalib's PatchCore and FastFlow.

``common``: the shared run spec, data, evaluation, timing and size measurements;
``baselines``: anomalib PatchCore / FastFlow (same offline backbone) and their workers;
``moleflow``: the MoLE-Flow continual run and the backbone-alone worker;
``names``: the compared models and the figures each reports;
``targets``: MoLE-Flow's ratios to the others and its acceptance targets;
``markdown``: the report ``compare.md``; ``plots``: its figures.
"""
