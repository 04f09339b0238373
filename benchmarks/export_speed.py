"""Export speed: one continual MoLE-Flow model as PyTorch, ONNX Runtime and OpenVINO, beside its backbone.

    python benchmarks/export_speed.py --tasks 2 15 --threads 1

Trains one continual run over the largest ``--tasks`` count of generated products
(``anomalib_moleflow.data.synthetic``; few images and epochs: speed is the point, not quality)
and takes its task checkpoint after each requested count (``--checkpoint`` takes saved task
checkpoints instead). Each model is exported as the one graph of the whole continual model
(router, every expert, per-product normalisation: ``MoLEFlow.to_onnx`` and ``to_openvino``, what
``anomalib export`` runs) and timed on raw images mixing all its products:

* batch 1: median latency in ms over ``--latency-runs`` images (round-robin over the products),
  the backends interleaved on each image so a CPU slowed meanwhile slows all of them;
* batch ``--throughput-batch`` (32): images per second, median of ``--throughput-runs`` batches;

for the PyTorch routed forward (eager), ONNX Runtime (CPU provider), OpenVINO
(``Core().compile_model(xml, "CPU")``, f32) and the bare backbone alone (the floor; its stages the
model reads, on pre-processed images, in each of the three runtimes), at ``--threads`` threads
(torch intra-op threads, ORT ``intra_op_num_threads``, OpenVINO ``INFERENCE_NUM_THREADS``).
It also checks, on every test image of every product, that ONNX Runtime and OpenVINO route each
image to the same product as PyTorch (``product_agreement``) and the largest relative score
difference. Writes ``benchmarks/results/export_speed.{json,md}`` with the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from anomalib.data.utils import read_image
from reporting import finish_meta, header_line, markdown_table, run_meta, write_json

from anomalib_moleflow.continual import ContinualRunner, RunOptions, TaskStream, TrainerOptions
from anomalib_moleflow.data.synthetic import STREAMS, make_products
from anomalib_moleflow.io import safe_torch_load
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig
from anomalib_moleflow.models.moleflow.export import product_names

RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = ("pytorch", "onnxruntime", "openvino", "backbone_pytorch", "backbone_onnxruntime", "backbone_openvino")
"""Rows of every model: the routed model in three runtimes, then the backbone floor in the same three."""
ROW_KEYS = (
    "backend", "latency_ms_batch1_median", "latency_ms_batch1_min", "throughput_img_per_s",
    "latency_x_floor", "product_agreement", "max_rel_score_diff", "max_abs_score_diff",
)  # fmt: skip
OV_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
"""OpenVINO compile options besides the thread count: full precision (the CPU plugin may pick bf16 otherwise)."""

__all__ = ["BACKENDS", "ROW_KEYS", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 15], help="product counts of the models timed (one run to the largest)")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=None, help="task checkpoints to time instead of training")
    p.add_argument("--data-root", type=Path, default=None,
                   help="with --checkpoint: MVTec-layout root of its products' test images (default: the run's data root)")
    p.add_argument("--train-images", type=int, default=16, help="normal training images per product")
    p.add_argument("--test-images", type=int, default=4, help="test images per product (half defective)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per task")
    p.add_argument("--image-px", type=int, default=256, help="side of the generated images")
    p.add_argument("--stream", choices=sorted(STREAMS), default="lookalike", help="synthetic stream of products")
    p.add_argument("--train-batch-size", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--warmup", type=int, default=3, help="untimed forwards per backend before timing")
    p.add_argument("--latency-runs", type=int, default=30, help="timed batch-1 images (at least one per product)")
    p.add_argument("--throughput-batch", type=int, default=32)
    p.add_argument("--throughput-runs", type=int, default=3, help="timed batches per backend (median)")
    p.add_argument("--threads", type=int, default=1, help="torch / ONNX Runtime / OpenVINO threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=RESULTS, help="where export_speed.{json,md} go")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data, run and exported files here (default: a temp folder)")
    p.add_argument("--model-config", default=None,
                   help='JSON of MoLEFlowConfig fields to override, nested or flat (as scale.py takes it)')
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models
def train(args: argparse.Namespace, work: Path, config: MoLEFlowConfig) -> tuple[list[Path], Path]:
    """One continual run over ``max(--tasks)`` products; its task checkpoint after each requested count."""
    counts = sorted(set(args.tasks))
    data_root = work / "data"
    names = make_products(data_root, counts[-1], n_train=args.train_images, n_test=args.test_images,
                          size=args.image_px, seed=args.seed, stream=args.stream)  # fmt: skip
    stream = TaskStream(names, root=str(data_root), train_batch_size=args.train_batch_size,
                        eval_batch_size=args.eval_batch_size, num_workers=0, seed=args.seed)  # fmt: skip
    runner = ContinualRunner(config, stream, TrainerOptions(max_epochs=args.epochs),
                             RunOptions(output_dir=str(work / "run"), seed=args.seed))  # fmt: skip
    runner.run()
    return [runner.checkpoint_path(n - 1) for n in counts], data_root


def product_test_images(root: Path, products: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Every test image of every product (``<root>/<product>/test/*/*.png``), raw in ``[0, 1]``, and its product."""
    images, owners = [], []
    for name in products:
        paths = sorted((root / name / "test").glob("*/*.png"))
        if not paths:
            raise SystemExit(f"no test images of '{name}' under '{root / name / 'test'}'; pass --data-root")
        images += [read_image(p, as_tensor=True) for p in paths]
        owners += [name] * len(paths)
    return torch.stack(images), owners


def round_robin(images: torch.Tensor, owners: list[str], count: int) -> torch.Tensor:
    """``count`` images taken in turn from each product."""
    per_product = {name: [i for i, o in enumerate(owners) if o == name] for name in dict.fromkeys(owners)}
    lists = list(per_product.values())
    picks = [lists[i % len(lists)][(i // len(lists)) % len(lists[i % len(lists)])] for i in range(count)]
    return images[picks]


class BackboneFloor(torch.nn.Module):
    """The model's backbone alone (every stage it reads), on pre-processed images."""

    def __init__(self, module: MoLEFlow) -> None:
        super().__init__()
        self.backbone = module.model.feature_extractor.backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.backbone(images))


def export_backbone(module: MoLEFlow, folder: Path, size: int) -> tuple[Path, Path]:
    """The backbone floor as ONNX (dynamic batch) and OpenVINO IR."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path, xml = folder / "backbone.onnx", folder / "backbone.xml"
    floor = BackboneFloor(module).eval()
    with torch.no_grad():
        torch.onnx.export(floor, (torch.rand(2, 3, size, size),), str(onnx_path), dynamo=True, input_names=["input"],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1)}}, opset_version=18)  # fmt: skip
    ov.save_model(ov.convert_model(onnx_path), xml, compress_to_fp16=False)
    return onnx_path, xml


def ort_runner(path: Path, threads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda x: dict(zip(names, session.run(None, {session.get_inputs()[0].name: x}), strict=True))


def ov_runner(path: Path, threads: int) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {**OV_CONFIG, "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    names = [o.any_name for o in compiled.outputs]

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        result = request.infer({0: x})
        return {name: np.asarray(result[output]) for name, output in zip(names, compiled.outputs, strict=True)}

    return run


def agreement(want_task: np.ndarray, want_score: np.ndarray, task: np.ndarray, score: np.ndarray) -> dict[str, float]:
    """Share of images routed to the same product as PyTorch (``want_*``), and the score differences."""
    diff = np.abs(score.astype(np.float64) - want_score.astype(np.float64))
    return {
        "product_agreement": float((task == want_task).mean()),
        "max_rel_score_diff": float((diff / np.maximum(np.abs(want_score), 1e-6)).max()),
        "max_abs_score_diff": float(diff.max()),
    }


def timed_ms(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return 1000.0 * (time.perf_counter() - start)


def measure(module: MoLEFlow, files: dict[str, Path], images: torch.Tensor, owners: list[str],
            args: argparse.Namespace) -> list[dict[str, Any]]:  # fmt: skip
    """One row per backend (:data:`BACKENDS`, keys :data:`ROW_KEYS`)."""
    n_products = len(dict.fromkeys(owners))
    ort_model, ov_model = ort_runner(files["onnx"], args.threads), ov_runner(files["openvino"], args.threads)
    ort_floor, ov_floor = ort_runner(files["backbone_onnx"], args.threads), ov_runner(files["backbone_openvino"], args.threads)
    backbone = BackboneFloor(module).eval()
    prepare = module.prepare_images
    runs: dict[str, tuple[Callable[[torch.Tensor], object], bool]] = {  # backend -> (forward, takes pre-processed images)
        "pytorch": (lambda x: module(x), False),
        "onnxruntime": (lambda x: ort_model(x.numpy()), False),
        "openvino": (lambda x: ov_model(x.numpy()), False),
        "backbone_pytorch": (lambda x: backbone(x), True),
        "backbone_onnxruntime": (lambda x: ort_floor(x.numpy()), True),
        "backbone_openvino": (lambda x: ov_floor(x.numpy()), True),
    }
    count = max(args.latency_runs, n_products)
    singles = round_robin(images, owners, args.warmup + count)
    batch = round_robin(images, owners, args.throughput_batch)
    with torch.no_grad():
        inputs = {False: (singles, batch), True: (prepare(singles), prepare(batch))}
        for name, (fn, pre) in runs.items():  # warm-ups, both batch sizes (OpenVINO compiles per shape)
            for i in range(args.warmup):
                fn(inputs[pre][0][i : i + 1])
            fn(inputs[pre][1])
        latency: dict[str, list[float]] = {name: [] for name in BACKENDS}
        for i in range(args.warmup, args.warmup + count):
            order = BACKENDS if i % 2 == 0 else BACKENDS[::-1]
            for name in order:
                fn, pre = runs[name]
                latency[name].append(timed_ms(lambda fn=fn, x=inputs[pre][0][i : i + 1]: fn(x)))
        throughput: dict[str, list[float]] = {name: [] for name in BACKENDS}
        for r in range(max(1, args.throughput_runs)):
            for name in BACKENDS if r % 2 == 0 else BACKENDS[::-1]:
                fn, pre = runs[name]
                throughput[name].append(timed_ms(lambda fn=fn, x=inputs[pre][1]: fn(x)))
        checks: dict[str, dict[str, float]] = {}
        chunks = [images[i : i + 32] for i in range(0, len(images), 32)]
        reference = [module(x) for x in chunks]
        want_task = torch.cat([r.pred_task.reshape(-1) for r in reference]).numpy()
        want_score = torch.cat([r.pred_score.reshape(-1) for r in reference]).numpy()
        for name, run in (("onnxruntime", ort_model), ("openvino", ov_model)):
            got = [run(x.numpy()) for x in chunks]
            task = np.concatenate([np.asarray(g["pred_task"]).reshape(-1) for g in got])
            score = np.concatenate([np.asarray(g["pred_score"]).reshape(-1) for g in got])
            checks[name] = agreement(want_task, want_score, task, score)
    rows = []
    for name in BACKENDS:
        floor = statistics.median(latency["backbone_" + name.removeprefix("backbone_")])
        median = statistics.median(latency[name])
        rows.append({
            "backend": name,
            "latency_ms_batch1_median": median,
            "latency_ms_batch1_min": min(latency[name]),
            "throughput_img_per_s": 1000.0 * args.throughput_batch / statistics.median(throughput[name]),
            "latency_x_floor": median / floor,
            "product_agreement": 1.0 if name == "pytorch" else checks.get(name, {}).get("product_agreement"),
            "max_rel_score_diff": 0.0 if name == "pytorch" else checks.get(name, {}).get("max_rel_score_diff"),
            "max_abs_score_diff": 0.0 if name == "pytorch" else checks.get(name, {}).get("max_abs_score_diff"),
        })  # fmt: skip
    return rows


def size_mib(*paths: Path) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 2**20


def time_model(checkpoint: Path, data_root: Path | None, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export one task checkpoint and time it (see the module docstring)."""
    module = MoLEFlow.from_checkpoint(checkpoint).eval()
    products = list(module.model.task_names)
    root = data_root or Path(safe_torch_load(checkpoint)["stream"]["root"])
    images, owners = product_test_images(root, products)
    size = module.config.features.image_size
    if tuple(images.shape[-2:]) != (size, size):  # the graph takes images at the size it was exported for
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    start = time.perf_counter()
    onnx_path = module.to_onnx(folder)
    onnx_seconds = time.perf_counter() - start
    start = time.perf_counter()
    xml = module.to_openvino(folder)  # anomalib's: ONNX again, then ov.convert_model, f32
    openvino_seconds = time.perf_counter() - start
    assert product_names(onnx_path) == products and product_names(xml) == products
    backbone_onnx, backbone_xml = export_backbone(module, folder / "backbone", size)
    files = {"onnx": onnx_path, "openvino": xml, "backbone_onnx": backbone_onnx, "backbone_openvino": backbone_xml}
    rows = measure(module, files, images, owners, args)
    return {
        "n_products": len(products),
        "products": products,
        "checkpoint": str(checkpoint),
        "image_size": size,
        "backbone": module.config.features.backbone,
        "agreement_images": len(owners),
        "params_total": sum(p.numel() for p in module.model.parameters()),
        "onnx_export_seconds": onnx_seconds,
        "openvino_export_seconds": openvino_seconds,
        "onnx_mib": size_mib(onnx_path, onnx_path.with_suffix(".onnx.data")),
        "openvino_mib": size_mib(xml, xml.with_suffix(".bin")),
        "checkpoint_mib": size_mib(checkpoint),
        "rows": rows,
    }


# ----------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    s = meta["settings"]
    lines = [
        "# Export speed: PyTorch, ONNX Runtime and OpenVINO", "",
        header_line(meta), "",
        f"One graph of the whole continual model (router, every expert, per-product normalisation) as "
        f"`MoLEFlow.to_onnx` / `to_openvino` write it; images mix all products. Batch 1: median of "
        f"{s['latency_runs']} images (at least one per product), backends interleaved; batch "
        f"{s['throughput_batch']}: median of {s['throughput_runs']} batches. {s['threads']} thread(s) in every "
        f"runtime (torch, ORT `intra_op_num_threads`, OpenVINO `INFERENCE_NUM_THREADS`, f32). `x floor`: batch-1 "
        f"latency over the backbone's in the same runtime. Agreement: share of the "
        f"test images routed to the same product as PyTorch; score difference relative to PyTorch's score.", "",
        f"Model: {meta['model_config_note']}.", "",
    ]  # fmt: skip
    header = ("products", "backend", "batch-1 ms (median)", "batch-1 ms (min)", f"batch-{s['throughput_batch']} img/s",
              "x floor", "product agreement", "max rel. score diff")  # fmt: skip
    table = []
    for model in result["models"]:
        for row in model["rows"]:
            table.append((
                model["n_products"], row["backend"].replace("_", " "), _fmt(row["latency_ms_batch1_median"], ".1f"),
                _fmt(row["latency_ms_batch1_min"], ".1f"), _fmt(row["throughput_img_per_s"], ".1f"),
                _fmt(row["latency_x_floor"], ".2f"), _fmt(row["product_agreement"], ".3f"), _fmt(row["max_rel_score_diff"], ".1e"),
            ))  # fmt: skip
    lines += markdown_table(header, table)
    lines += ["", "| products | parameters | checkpoint MiB | ONNX MiB | OpenVINO MiB | ONNX export s | OpenVINO export s | agreement images |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m in result["models"]:
        lines.append(f"| {m['n_products']} | {m['params_total']:,} | {m['checkpoint_mib']:.1f} | {m['onnx_mib']:.1f} | "
                     f"{m['openvino_mib']:.1f} | {m['onnx_export_seconds']:.1f} | {m['openvino_export_seconds']:.1f} | "
                     f"{m['agreement_images']} |")  # fmt: skip
    return "\n".join([*lines, ""])


def write_results(result: dict[str, Any], output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "export_speed.json", output_dir / "export_speed.md"]
    write_json(paths[0], result)
    paths[1].write_text(markdown(result))
    return paths


def _run(args: argparse.Namespace, work: Path, config: MoLEFlowConfig) -> list[dict[str, Any]]:
    if args.checkpoint:
        checkpoints, data_root = list(args.checkpoint), args.data_root
    else:
        if (work / "run").exists():
            raise SystemExit(f"'{work / 'run'}' exists: choose another --work-dir")
        checkpoints, data_root = train(args, work, config)
    models = []
    for checkpoint in checkpoints:
        model = time_model(checkpoint, data_root, work / "export" / checkpoint.stem, args)
        print(json.dumps({"n_products": model["n_products"], "rows": model["rows"]}), flush=True)
        models.append(model)
    return models


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark and write its results; returns what ``export_speed.json`` holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    overrides = json.loads(args.model_config) if args.model_config else {}
    config = MoLEFlowConfig.from_dict(overrides)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.work_dir:
        models = _run(args, args.work_dir, config)
    else:
        with tempfile.TemporaryDirectory(prefix="moleflow_export_speed_") as tmp:
            models = _run(args, Path(tmp), config)
    import onnxruntime
    import openvino

    meta = finish_meta(run_meta("export_speed.py", argv), start)
    settings = {k: (str(v) if isinstance(v, Path) else [str(p) for p in v] if k == "checkpoint" and v else v)
                for k, v in vars(args).items()}  # fmt: skip
    meta.update({
        "settings": settings,
        "model_config": None if args.checkpoint else config.to_dict(),
        "model_config_note": "the checkpoints' own" if args.checkpoint
        else f"MoLEFlowConfig() with {json.dumps(overrides)}" if overrides else "MoLEFlowConfig() defaults",
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
        "openvino_config": {**OV_CONFIG, "INFERENCE_NUM_THREADS": args.threads},
    })  # fmt: skip
    result = {"meta": meta, "models": models}
    for path in write_results(result, args.output_dir):
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
