"""Where MoLE-Flow's routed inference time goes (batch 1), from a continual checkpoint.

    python benchmarks/profile_inference.py results/compare/moleflow_run/checkpoints/task_01_transistor.ckpt

Times each stage of ``MoLEFlowModel.forward`` separately (median of ``--repeats`` runs after
warm-ups, ``--threads`` torch threads) and adds torch.profiler's operator table; writes
``benchmarks/results/profile_inference.md`` with the command.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from anomalib_moleflow.backbones import create_feature_extractor
from anomalib_moleflow.continual.runner import load_continual_model

RESULTS = Path(__file__).parent / "results"


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
    model = load_continual_model(checkpoint).model.eval()
    size = model.config.image_size
    image = torch.rand(1, 3, size, size)
    extractor, key = model.feature_extractor, model.task_keys[-1]
    cfg = model.config
    floor = create_feature_extractor(cfg.backbone, out_indices=cfg.layers, pretrained=False, img_size=size).eval()
    with torch.no_grad():
        features = model.extract_features(image)
        patch = features[..., : model.channels]
        scores = model.patch_scores(features, key)
        rows = [
            ("backbone, patch stages only (the floor PatchCore and FastFlow share)", median_ms(lambda: floor(image), repeats)),
            ("backbone, all stages the model reads (adds the global score's stage)", median_ms(lambda: extractor.backbone(image), repeats)),
            ("patch features (backbone + aggregation, pooling, position, global)", median_ms(lambda: model.extract_features(image), repeats)),
            ("router (pooled features, Mahalanobis to every task)", median_ms(lambda: model.route(features), repeats)),
            ("input adapter + spatial mixer", median_ms(lambda: model.spatial_mixer(model.input_adapters[key](patch)), repeats)),
            ("base flow (8 coupling blocks, merged LoRA)", median_ms(lambda: model.flow(patch), repeats)),
            ("expert flow forward (adapter, mixer, flow, DIA)", median_ms(lambda: model.flow_forward(features, key), repeats)),
            ("anomaly map (upsample + blur) and image score", median_ms(lambda: (model.anomaly_map_generator(scores), model.anomaly_map_generator.image_score(scores)), repeats)),
            ("position Gaussian (added to the map)", median_ms(lambda: model.position_gaussian(key, features) if model.position_gaussian else None, repeats)),
            ("global score", median_ms(lambda: model.global_score(key, scores.flatten(1).mean(1), model._global_input(features)) if model.global_score else None, repeats)),
            ("whole routed forward", median_ms(lambda: model(image), repeats)),
        ]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                model(image)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return rows, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, table = stage_times(args.checkpoint, args.repeats)
    command = "python benchmarks/profile_inference.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = [
        "# Where MoLE-Flow's batch-1 inference time goes", "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, {args.threads} torch thread(s), median of {args.repeats}).", "",
        "| stage | ms |", "|---|---|",
        *[f"| {name} | {ms:.1f} |" for name, ms in rows],
        "", "Stages overlap (each row is timed on its own; the flow rows are part of the expert row).", "",
        "torch.profiler, 5 routed forwards, top operators by self CPU time:", "", "```", table, "```", "",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "profile_inference.md").write_text("\n".join(lines))
    print("\n".join(lines[:len(rows) + 8]))


if __name__ == "__main__":
    main()
