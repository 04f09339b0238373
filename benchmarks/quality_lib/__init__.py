"""Parts of the quality benchmark (``benchmarks/quality.py``): the nearest-neighbour ceiling, the
product list, and the report."""
