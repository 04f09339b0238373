"""What the scale benchmark runs: every command-line option of ``benchmarks/scale.py``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ScaleSettings:
    """Stream size, data, timing and threads of one scale run."""

    tasks: int = 15
    train_images: int = 32
    test_images: int = 10
    epochs: int = 3
    later_epochs: int | None = None
    image_px: int = 256
    train_batch_size: int = 16
    eval_batch_size: int = 16
    warmup: int = 3
    latency_runs: int = 20
    throughput_batch: int = 32
    throughput_runs: int = 3
    threads: int = 1
    seed: int = 0
    stream: str = "lookalike"
    """Synthetic stream (``anomalib_moleflow.data.synthetic.STREAMS``): ``lookalike`` (five families of
    three look-alike products, small realistic defects) or ``distinct`` (fifteen products that differ
    in colour and texture, large contrasting blobs)."""
