"""Where MoLE-Flow's routed inference time goes (batch 1), from a continual checkpoint.

    python benchmarks/profile_inference.py results/compare/moleflow_run/checkpoints/task_01_transistor.ckpt

Times each stage of ``MoLEFlowModel.forward`` separately (median of ``--repeats`` runs after
warm-ups, ``--threads`` torch threads) and adds torch.profiler's operator table; writes
``<output-dir>/profile_inference.md`` with the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from reporting import header_line, markdown_table, run_meta
from torch.profiler import ProfilerActivity, profile

from anomalib_moleflow.backbones import create_feature_extractor
from anomalib_moleflow.models.moleflow import MoLEFlow

RESULTS = Path(__file__).resolve().parent / "results"


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def stage_times(checkpoint: Path, repeats: int) -> tuple[list[tuple[str, float]], str]:
    """``(stage, ms)`` rows and the profiler table for one random pre-processed image."""
    model = MoLEFlow.from_checkpoint(checkpoint).model.eval()
    cfg = model.config
    size = cfg.features.image_size
    image = torch.rand(1, 3, size, size)
    extractor, key = model.feature_extractor, model.task_keys[-1]
    floor = create_feature_extractor(cfg.features.backbone, out_indices=cfg.features.layers, pretrained=False,
                                     img_size=size).eval()  # fmt: skip
    with torch.no_grad():
        features = model.extract_features(image)
        patch = features[..., : model.channels]
        scores = model.patch_scores(features, key)
        stages: list[tuple[str, Callable[[], object]]] = [
            ("backbone, patch stages only (the floor PatchCore and FastFlow share)", lambda: floor(image)),
            ("backbone, all stages the model reads (adds the global score's stage)", lambda: extractor.backbone(image)),
            ("patch features (backbone + aggregation, pooling, position, global)", lambda: model.extract_features(image)),
            ("router (pooled features, Mahalanobis to every task)", lambda: model.route(features)),
            ("input adapter + spatial mixer", lambda: model.spatial_mixer(model.input_adapters[key](patch))),
            (f"base flow ({cfg.flow.n_coupling_blocks} coupling blocks, merged LoRA)", lambda: model.flow(patch)),
            ("expert flow forward (adapter, mixer, flow, DIA)", lambda: model.flow_forward(features, key)),
            ("anomaly map (upsample + blur) and image score",
             lambda: (model.anomaly_map_generator(scores), model.anomaly_map_generator.image_score(scores))),
            ("position Gaussian (added to the map)",
             lambda: model.position_gaussian(key, features) if model.position_gaussian else None),
            ("global score", lambda: model.global_score(key, scores.flatten(1).mean(1), model.global_input(features))
             if model.global_score else None),
            ("whole routed forward", lambda: model(image)),
        ]  # fmt: skip
        rows = [(name, median_ms(fn, repeats)) for name, fn in stages]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(image)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return rows, table


def markdown(meta: dict[str, object], rows: list[tuple[str, float]], table: str, repeats: int) -> str:
    """``profile_inference.md``: the stage table and the profiler's operator table."""
    lines = [
        "# Where MoLE-Flow's batch-1 inference time goes", "",
        f"{header_line(meta)} Median of {repeats} runs per stage.", "",
        *markdown_table(("stage", "ms"), [(name, f"{ms:.1f}") for name, ms in rows]),
        "", "Stages overlap (each row is timed on its own; the flow rows are part of the expert row).", "",
        "torch.profiler, 5 routed forwards, top operators by self CPU time:", "", "```", table, "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Profile the checkpoint and write the report; returns it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a continual run's task checkpoint (or any MoLE-Flow checkpoint)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where profile_inference.md goes")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, table = stage_times(args.checkpoint, args.repeats)
    text = markdown(run_meta("profile_inference.py", argv), rows, table, args.repeats)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "profile_inference.md").write_text(text)
    print("\n".join(text.splitlines()[: len(rows) + 6]))
    return text


if __name__ == "__main__":
    main()
