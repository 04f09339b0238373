"""Routers and unknown-product scores side by side on every real product, from backbone features.

    python benchmarks/routing_study.py --mvtec-root ../shared/data/mvtec_ad --elpv-root ../shared/data/elpv

Routing and the unknown-product test read only per-task statistics of the frozen backbone's
features (prototypes, the patch memory, Gaussians), never the flow, so this study trains nothing:
it extracts every product's train and test features once (``real_four.yaml``: bottle, transistor,
elpv_mono, elpv_poly; the model settings of that config), then per seed (the patch memory's
sampling and the training images' order) fits the statistics and measures:

1. routing accuracy of each router of ``routing_lib/scores.py`` on every test image, and on the
   defective ones alone;
2. unknown products, leaving one out: each product in turn is hidden (its statistics unused) and
   its test images must score higher than every other product's test images, defective ones
   included: AUROC, and at ratio thresholds 1.5 and 2.0 (1.0 = the 99th percentile of a task's
   held-out training images) the share of known images rejected and of unknown ones caught.

Protocol: a variant is chosen on the ``--choose`` products (default bottle and elpv_mono) and
confirmed on the others; the report says which wins on each set. A few minutes on a 2-core CPU.
Writes ``<results-dir>/routing_study.{json,md}`` with the command.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from quality import CONFIG, stream_config
from reporting import finish_meta, header_line, markdown_table, run_meta, write_results
from routing_lib.scores import ROUTERS, UNKNOWN_SCORES, StudyModel, fit_study
from torchmetrics.functional.classification import binary_auroc

from anomalib_moleflow.continual import TaskStream
from anomalib_moleflow.continual.metrics import unit_range
from anomalib_moleflow.models.moleflow import MoLEFlow, MoLEFlowConfig, MoLEFlowModel

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
THRESHOLDS = (1.5, 2.0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mvtec-root", default="../shared/data/mvtec_ad", help="folder holding bottle/ and transistor/")
    parser.add_argument("--elpv-root", default="../shared/data/elpv", help="folder holding mono/ and poly/")
    parser.add_argument("--config", default=str(CONFIG), help="the continual YAML of the products (its model and data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="patch-memory sampling seeds")
    parser.add_argument("--choose", default="bottle,elpv_mono", help="comma-separated products a variant is chosen on")
    parser.add_argument("--results-dir", default=str(RESULTS), help="where routing_study.{json,md} go")
    parser.add_argument("--work-dir", default="results/routing_study", help="scratch folder (the stream YAML)")
    return parser.parse_args(argv)


@torch.no_grad()
def extract(model: MoLEFlow, stream: TaskStream) -> dict[str, dict[str, torch.Tensor]]:
    """Every product's train and test features (float16 to save memory) and test labels; the training
    loader's shuffle is seeded, so a rerun sees the images in the same order."""
    torch.manual_seed(0)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(stream.names):
        datamodule = stream.datamodule(index)
        datamodule.setup()
        parts: dict[str, torch.Tensor] = {}
        for split, loader in (("train", datamodule.train_dataloader()), ("test", datamodule.test_dataloader())):
            feats, labels = [], []
            for batch in loader:
                feats.append(model.model.extract_features(model.prepare_batch(batch)[0]).half())
                labels.append(batch.gt_label.long())
            parts[split], parts[f"{split}_label"] = torch.cat(feats), torch.cat(labels)
        out[name] = parts
        print(f"features {name}: train {tuple(parts['train'].shape)}, test {tuple(parts['test'].shape)}", flush=True)
    return out


def _auroc(known: torch.Tensor, unknown: torch.Tensor) -> float:
    scores = torch.nan_to_num(torch.cat([known, unknown]).double(), posinf=1e12)
    labels = torch.cat([torch.zeros(len(known)), torch.ones(len(unknown))]).long()
    return float(binary_auroc(unit_range(scores), labels))


@torch.no_grad()
def measure(study: StudyModel, test: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Routing accuracy per router and product; unknown-product rows per score and hidden product."""
    names = study.names
    routing: dict[str, dict[str, dict[str, float]]] = {}
    for router_name, router in ROUTERS.items():
        routing[router_name] = {}
        for index, name in enumerate(names):
            choice = torch.cat([router(study, chunk) for chunk in test[name].split(50)])
            right = choice == index
            defective = labels[name] == 1
            routing[router_name][name] = {"all": float(right.double().mean()), "defective": float(right[defective].double().mean())}
    unknown: dict[str, dict[str, dict[str, float]]] = {}
    for score_name, score in UNKNOWN_SCORES.items():
        ratios = {name: torch.cat([score(study, chunk) for chunk in test[name].split(50)]) for name in names}
        unknown[score_name] = {}
        for hidden, hidden_name in enumerate(names):
            def best(name: str, hidden: int = hidden) -> torch.Tensor:
                r = ratios[name].clone()
                r[:, hidden] = float("inf")
                return r.min(dim=1).values

            known = torch.cat([best(n) for n in names if n != hidden_name])
            caught = best(hidden_name)
            row = {"AUROC": _auroc(known, caught)}
            for t in THRESHOLDS:
                row[f"false_rejects@{t}"] = float((known > t).double().mean())
                row[f"caught@{t}"] = float((caught > t).double().mean())
            unknown[score_name][hidden_name] = row
    return {"routing": routing, "unknown": unknown}


def _mean(values: Sequence[float]) -> float:
    return float(statistics.fmean(values))


def summarise(runs: Sequence[dict[str, Any]], names: Sequence[str], choose: Sequence[str]) -> dict[str, Any]:
    """Means (and minima) over seeds, and the variant that wins on the choose / confirm products."""
    confirm = [n for n in names if n not in choose]
    routing = {r: {n: {k: _mean([run["routing"][r][n][k] for run in runs]) for k in ("all", "defective")}
                   | {"min_all": min(run["routing"][r][n]["all"] for run in runs)} for n in names} for r in ROUTERS}  # fmt: skip
    unknown = {s: {n: {k: _mean([run["unknown"][s][n][k] for run in runs]) for k in runs[0]["unknown"][s][n]} for n in names}
               for s in UNKNOWN_SCORES}  # fmt: skip

    def winner(table: dict[str, dict[str, dict[str, float]]], key: str, products: Sequence[str]) -> str:
        return max(table, key=lambda v: _mean([table[v][p][key] for p in products]) if products else 0.0)

    return {
        "routing": routing,
        "unknown": unknown,
        "choose": list(choose),
        "confirm": confirm,
        "best_router": {"choose": winner(routing, "all", choose), "confirm": winner(routing, "all", confirm)},
        "best_unknown": {"choose": winner(unknown, "AUROC", choose), "confirm": winner(unknown, "AUROC", confirm)},
    }


def markdown(data: dict[str, Any]) -> str:
    """``routing_study.md`` from what ``routing_study.json`` holds."""
    meta, summary, names = data["meta"], data["summary"], data["products"]
    seeds = data["seeds"]
    lines = [
        "# Routers and unknown-product scores, side by side",
        "",
        header_line(meta),
        "",
        "Backbone features only (no flow is trained: routing and the unknown test read per-task statistics of the "
        f"frozen features). Products: {', '.join(names)}; model settings of `{data['config']}`. Each cell is the mean "
        f"over {len(seeds)} seeds of the patch memory's sampling and the training images' order (seeds {', '.join(map(str, seeds))}).",
        "",
        "## Routing accuracy (all test images / defective ones; worst seed in brackets)",
        "",
    ]
    rows = [[router, *[f"{r[n]['all']:.3f} / {r[n]['defective']:.3f} [{r[n]['min_all']:.3f}]" for n in names]]
            for router, r in summary["routing"].items()]  # fmt: skip
    lines += markdown_table(["router", *names], rows)
    lines += ["", "## Unknown products, leaving one out (AUROC; false rejects / caught at ratio 1.5)", ""]
    rows = [[score, *[f"{u[n]['AUROC']:.4f} ({u[n]['false_rejects@1.5']:.3f} / {u[n]['caught@1.5']:.3f})" for n in names]]
            for score, u in summary["unknown"].items()]  # fmt: skip
    lines += markdown_table(["unknown score", *[f"{n} hidden" for n in names]], rows)
    choose, confirm = ", ".join(summary["choose"]), ", ".join(summary["confirm"]) or "none"
    lines += [
        "",
        "## Chosen on some products, confirmed on others",
        "",
        f"Choose set: {choose}; confirm set: {confirm}. Known images are every other product's test images, "
        "defective ones included; the unknown score of an image is its smallest ratio over the products it may be. "
        "A tie goes to the variant listed first (the model default).",
        "",
        f"- Router with the best mean accuracy on the choose set: {summary['best_router']['choose']}; on the confirm set: "
        f"{summary['best_router']['confirm']}.",
        f"- Unknown score with the best mean AUROC on the choose set: {summary['best_unknown']['choose']}; on the confirm "
        f"set: {summary['best_unknown']['confirm']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Extract features, fit and measure every seed, write the results; returns what the JSON holds."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = stream_config(args, work)
    config = yaml.safe_load(config_path.read_text())
    stream = TaskStream(**config["data"])
    model_config = MoLEFlowConfig.from_dict(config.get("model", {}).get("config") or {})
    choose = [n.strip() for n in args.choose.split(",") if n.strip()]
    unknown_names = sorted(set(choose) - set(stream.names))
    if unknown_names:
        raise SystemExit(f"--choose names {unknown_names} are not products of {args.config} ({stream.names})")
    extractor = MoLEFlow(config=model_config).eval()
    features = extract(extractor, stream)
    test = {n: features[n]["test"].float() for n in stream.names}
    labels = {n: features[n]["test_label"] for n in stream.names}
    runs = []
    for seed in args.seeds:
        model = MoLEFlowModel(model_config).eval()
        if model.patch_memory is None:
            raise SystemExit("routing_study needs the patch memory (scoring.patch_memory_size > 0)")
        model.patch_memory.seed = seed
        order = {n: torch.randperm(len(features[n]["train"]), generator=torch.Generator().manual_seed(seed)) for n in stream.names}
        train = [features[n]["train"][order[n]].float() for n in stream.names]
        study = fit_study(model, stream.names, train)
        runs.append({"seed": seed, **measure(study, test, labels)})
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", flush=True)
    data = {
        "meta": finish_meta(run_meta("routing_study.py", argv), start),
        "config": Path(args.config).name,
        "products": stream.names,
        "seeds": args.seeds,
        "runs": runs,
        "summary": summarise(runs, stream.names, choose),
    }
    write_results(Path(args.results_dir), "routing_study", data, markdown)
    return data


if __name__ == "__main__":
    main()
