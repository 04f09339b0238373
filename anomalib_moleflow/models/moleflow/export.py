"""One exported graph for a whole (continual) MoLE-Flow model: pre-processing, router, every
expert, per-product normalisation and thresholds, with the product index as an extra output.

``MoLEFlow.to_onnx`` / ``to_openvino`` (so ``anomalib export`` and ``Engine.export``) write this
graph; :func:`export_onnx` and :func:`export_openvino` are the same with the options spelled out.
Its input is a batch of raw images ``(B, 3, H, W)`` in ``[0, 1]`` (dynamic ``B``; ``H, W`` the
size given at export, by default the model's input size); its outputs, in this order, are
anomalib's ``pred_score``, ``pred_label``, ``anomaly_map``, ``pred_mask`` and ``pred_task`` (the
index of the product that scored each image, ``-1`` for an unknown product); a model with raw
scores and no post-processor has no labels to give (``pred_score``, ``anomaly_map``, ``pred_task``). The product names
travel in the file's metadata (:data:`PRODUCT_NAMES_KEY`, a JSON list; :func:`product_names`).

The resize is the antialiased bilinear one of training, as two matrix products (exact to float
rounding, and every runtime has them): anomalib's own export transform drops the antialiasing,
which moved scores away from the thresholds fitted in training. The experts run stacked along a
task axis (:class:`~.stacked_experts.StackedExperts`), so the graph has no data-dependent branch.

:class:`MoLEFlowTorchInferencer` and :class:`MoLEFlowOpenVINOInferencer` are anomalib's
inferencers that also return ``pred_task`` and the product name of each image (``pred_product``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from anomalib.data import InferenceBatch, NumpyImageBatch
from anomalib.deploy import OpenVINOInferencer, TorchInferencer
from torch import nn
from torch.nn import functional as F

from anomalib_moleflow.backbones import backbone_normalization

from .stacked_experts import StackedExperts

if TYPE_CHECKING:
    from anomalib.data import ImageBatch

    from .lightning_model import MoLEFlow

__all__ = [
    "OUTPUT_NAMES",
    "PRODUCT_NAMES_KEY",
    "ExportGraph",
    "MoLEFlowOpenVINOInferencer",
    "MoLEFlowTorchInferencer",
    "export_onnx",
    "export_openvino",
    "product_names",
    "resize_matrix",
]

OUTPUT_NAMES = ("pred_score", "pred_label", "anomaly_map", "pred_mask", "pred_task")
UNLABELLED_OUTPUT_NAMES = ("pred_score", "anomaly_map", "pred_task")
"""The outputs of a model with raw scores and no post-processor (nothing to label with)."""
PRODUCT_NAMES_KEY = "moleflow_product_names"
"""Metadata key (ONNX ``metadata_props``; OpenVINO ``rt_info``) of the product names, a JSON list."""


def resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``(size_out, size_in)`` matrix of PyTorch's antialiased bilinear resize along one axis
    (``F.interpolate(..., mode="bilinear", antialias=True)`` is separable: rows, then columns)."""
    # one-hot columns, two pixels wide: PyTorch's kernel takes another path for a width of 1
    basis = torch.eye(size_in).view(size_in, 1, size_in, 1).expand(size_in, 1, size_in, 2).contiguous()
    resized = F.interpolate(basis, size=(size_out, 2), mode="bilinear", antialias=True, align_corners=False)
    return resized[..., 0].reshape(size_in, size_out).T.contiguous()


class ExportPreProcessor(nn.Module):
    """Training's pre-processing of raw ``(B, 3, H, W)`` images: the backbone's normalisation and an
    antialiased bilinear resize to the model's input size (two matrix products)."""

    def __init__(self, input_size: tuple[int, int], size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.resize = tuple(input_size) != tuple(size)
        self.register_buffer("rows", resize_matrix(input_size[0], size[0]))
        self.register_buffer("cols", resize_matrix(input_size[1], size[1]).T.contiguous())
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Resized, normalised images ``(B, 3, h, w)``."""
        # normalised first (the resize weights of each output pixel sum to 1, so the order does
        # not matter beyond rounding): OpenVINO's CPU plugin fails to fuse a per-channel
        # normalisation into the matrix product before it
        images = (images - self.mean) / self.std
        return self.rows @ images @ self.cols if self.resize else images


class ExportGraph(nn.Module):
    """What the exported file computes: raw images in, :data:`OUTPUT_NAMES` out.

    Args:
        module: The MoLE-Flow model (its experts and statistics are copied when this is built).
        input_size: ``(H, W)`` of the images the graph takes (default: the model's input size).
    """

    def __init__(self, module: MoLEFlow, input_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        model = module.model
        if model.num_tasks == 0:
            msg = "ExportGraph: the model has no task expert to export"
            raise ValueError(msg)
        features = model.config.features
        size = (features.image_size, features.image_size)
        self.input_size = tuple(input_size) if input_size is not None else size
        mean, std = backbone_normalization(features.backbone)
        self.pre_processor = ExportPreProcessor(self.input_size, size, tuple(mean), tuple(std))
        self.model = model
        self.stacked = StackedExperts(model)
        self.normalize = model.normalizes_scores
        self.routing = model.routing_active
        self.task = model.task_keys.index(model._oracle_key or model.active_task)
        self.post_processor = module.post_processor
        self.output_names = OUTPUT_NAMES if self.post_processor is not None or self.normalize else UNLABELLED_OUTPUT_NAMES
        """What the graph outputs: without a post-processor, raw scores have no labels."""
        self.product_names = list(model.task_names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:attr:`output_names` (``pred_score, pred_label, anomaly_map, pred_mask, pred_task``) of raw
        images ``(B, 3, H, W)``."""
        features = self.model.extract_features(self.pre_processor(images))
        if self.routing:
            pred_score, anomaly_map, route = self.stacked.predict(self.model, features, self.normalize)
        else:
            route = torch.full_like(features[:, 0, 0, 0], self.task, dtype=torch.long)
            pred_score, anomaly_map = self.stacked.score(self.model, features, route, self.normalize)
        if self.output_names == UNLABELLED_OUTPUT_NAMES:
            return pred_score, anomaly_map, route
        batch = InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
        if self.post_processor is not None:
            batch = self.post_processor(batch)
        else:  # normalised per product: threshold 0.5, as NormalizedScorePostProcessor
            batch = InferenceBatch(pred_score, pred_score > 0.5, anomaly_map, anomaly_map > 0.5)
        return batch.pred_score, batch.pred_label, batch.anomaly_map, batch.pred_mask, route


def export_onnx(module: MoLEFlow, path: str | Path, input_size: tuple[int, int] | None = None, **kwargs: Any) -> Path:
    """Write the :class:`ExportGraph` of ``module`` to the ONNX file ``path`` (dynamic batch), with
    the product names in its metadata; ``kwargs`` go to ``torch.onnx.export``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    try:
        graph = ExportGraph(module, input_size).eval()
        example = torch.rand(2, 3, *graph.input_size, device=next(module.parameters()).device)
        batch = torch.export.Dim("batch", min=1)
        kwargs.pop("dynamo", None)
        with torch.no_grad():
            torch.onnx.export(
                graph,
                (example,),
                str(path),
                dynamo=True,
                input_names=["input"],
                output_names=list(graph.output_names),
                dynamic_shapes={"images": {0: batch}},
                opset_version=kwargs.pop("opset_version", 18),
                **kwargs,
            )
    finally:
        module.train(was_training)
    exported = onnx.load(str(path), load_external_data=False)
    entry = exported.metadata_props.add()
    entry.key, entry.value = PRODUCT_NAMES_KEY, json.dumps(graph.product_names)
    onnx.save(exported, str(path))
    return path


def export_openvino(
    module: MoLEFlow, path: str | Path, input_size: tuple[int, int] | None = None, compress_to_fp16: bool = False, **kwargs: Any
) -> Path:
    """Write the :class:`ExportGraph` of ``module`` as OpenVINO IR ``path`` (``.xml`` and ``.bin``),
    the product names in its ``rt_info``; ``kwargs`` go to ``torch.onnx.export``."""
    import tempfile

    import openvino as ov

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        onnx_path = export_onnx(module, Path(folder) / "model.onnx", input_size, **kwargs)
        model = ov.convert_model(onnx_path)
    model.set_rt_info(json.dumps(list(module.model.task_names)), ["model_info", PRODUCT_NAMES_KEY])
    ov.save_model(model, path, compress_to_fp16=compress_to_fp16)
    return path


def product_names(path: str | Path) -> list[str]:
    """Product names of an exported file (``.onnx``, OpenVINO ``.xml``, or anomalib's ``.pt``)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if PRODUCT_NAMES_KEY in props:
            return list(json.loads(props[PRODUCT_NAMES_KEY]))
    elif path.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(path)
        for section in ("model_info", "framework"):  # OpenVINO keeps ONNX metadata under "framework"
            if model.has_rt_info([section, PRODUCT_NAMES_KEY]):
                return list(json.loads(model.get_rt_info([section, PRODUCT_NAMES_KEY]).astype(str)))
    elif path.suffix in {".pt", ".pth"}:
        module = torch.load(path, map_location="cpu", weights_only=False)["model"]  # nosec B614 - pickled by to_torch
        return list(module.model.task_names)
    msg = f"'{path}' holds no MoLE-Flow product names (an .onnx, .xml or .pt file exported from MoLE-Flow?)"
    raise ValueError(msg)


def _names_of(route: np.ndarray | torch.Tensor, names: list[str]) -> list[str | None]:
    return [names[int(i)] if int(i) >= 0 else None for i in np.asarray(route).reshape(-1)]


class MoLEFlowTorchInferencer(TorchInferencer):
    """anomalib's ``TorchInferencer`` whose batches also carry ``pred_task`` and ``pred_product``
    (the product name of each image, ``None`` for an unknown product)."""

    def predict(self, image: Any) -> ImageBatch:
        """Predict like ``TorchInferencer.predict``, adding the routed product of each image."""
        from anomalib.data import ImageBatch
        from anomalib.data.utils import read_image
        from torchvision.transforms.v2.functional import to_dtype, to_image

        if isinstance(image, str | Path):
            image = read_image(image, as_tensor=True)
        elif not isinstance(image, torch.Tensor):
            image = to_dtype(to_image(image), torch.float32, scale=True)
        image = self.pre_process(image)
        with torch.no_grad():
            predictions = self.model(image)
        batch = ImageBatch(image=image, **predictions._asdict())
        batch.pred_task = predictions.pred_task
        batch.pred_product = _names_of(predictions.pred_task.cpu(), list(self.model.model.task_names))
        return batch


class MoLEFlowOpenVINOInferencer(OpenVINOInferencer):
    """anomalib's ``OpenVINOInferencer`` for a MoLE-Flow graph: its batches also carry ``pred_task``
    and ``pred_product``; the product names come from the model file.

    OpenVINO runs a CPU graph in bf16 where the CPU supports it, which moves scores by a few percent
    and so labels at the fitted thresholds; this inferencer asks for f32 unless ``config`` says
    otherwise."""

    def __init__(self, path: str | Path | tuple[bytes, bytes], device: str | None = "AUTO", config: dict | None = None) -> None:
        super().__init__(path, device=device, config={"INFERENCE_PRECISION_HINT": "f32", **(config or {})})

    def load_model(self, path: str | Path | tuple[bytes, bytes]) -> tuple[Any, Any, Any]:
        """Load like ``OpenVINOInferencer.load_model`` and read the product names."""
        loaded = super().load_model(path)
        self.product_names = product_names(path) if not isinstance(path, tuple) else []
        return loaded

    @staticmethod
    def post_process(predictions: Any) -> dict:
        """The outputs by name."""
        return OpenVINOInferencer.post_process(predictions)

    def predict(self, image: Any) -> NumpyImageBatch:
        """Predict like ``OpenVINOInferencer.predict``, adding the routed product of each image."""
        from anomalib.data.utils import read_image

        if isinstance(image, str | Path):
            image = read_image(image, as_tensor=False)
        elif isinstance(image, torch.Tensor):
            image = image.cpu().numpy()
        elif not isinstance(image, np.ndarray):
            image = np.array(image) / 255.0
        image = self.pre_process(image)
        outputs = self.post_process(self.model({self.input_blob.any_name: image}))
        route = outputs.pop("pred_task")
        batch = NumpyImageBatch(image=image, **outputs)
        batch.pred_task = route
        batch.pred_product = _names_of(route, self.product_names)
        return batch
