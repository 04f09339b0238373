"""Ordered stream of tasks (products) for continual anomaly detection.

A task is an MVTec AD category (``kind: mvtec``) or an anomalib
:class:`~anomalib.data.Folder` dataset (``kind: folder``). The ``data:``
section of a continual config maps onto :class:`TaskStream`::

    data:
      root: ../shared/data/mvtec_ad        # root of the MVTec tasks
      tasks:
        - bottle                           # string = MVTec category
        - {name: my_part, kind: folder, root: /x, normal_dir: good, abnormal_dir: bad, mask_dir: masks}
      train_batch_size: 16
      eval_batch_size: 16
      num_workers: 2
      threshold_holdout: 0.1               # optional: fit the thresholds on 10% of the training images

Each task's score thresholds are fitted on its validation split: by default the test set itself
(anomalib's ``same_as_test``), or with ``threshold_holdout`` a held-out part of its training images,
which that task then does not train on (:attr:`TaskStream.threshold_split` says which).

Relative paths start from the working directory. :meth:`TaskStream.validate` checks every task.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from anomalib.data import AnomalibDataModule, Folder
from anomalib.data.utils import ValSplitMode
from torchvision.datasets.folder import IMG_EXTENSIONS

from anomalib_moleflow.continual.interruption import protect_workers
from anomalib_moleflow.data import MVTecADLocal, check_mvtec_layout
from anomalib_moleflow.data import mvtec as _mvtec
from anomalib_moleflow.models.moleflow.task_statistics.thresholds import (
    NORMAL_SCORE_QUANTILE,
)

__all__ = ["MVTEC_ALPHABETICAL_ORDER", "MVTEC_ORIGINAL_ORDER", "TaskSpec", "TaskStream"]

#: Task order of the MoLE-Flow notes ("original" 15-class MVTec AD order).
MVTEC_ORIGINAL_ORDER: tuple[str, ...] = (
    "leather", "grid", "transistor", "carpet", "zipper", "hazelnut", "toothbrush", "metal_nut",
    "screw", "wood", "tile", "capsule", "pill", "cable", "bottle",
)  # fmt: skip
#: The 15 MVTec AD categories in alphabetical order.
MVTEC_ALPHABETICAL_ORDER: tuple[str, ...] = tuple(sorted(MVTEC_ORIGINAL_ORDER))

_FOLDER_DIRS = ("normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir")
# check_mvtec_layout's hint speaks of a single-category config; the stream adds its own once.
_SINGLE_CONFIG_HINT: str | None = getattr(_mvtec, "_ROOT_HELP", None)
_ROOT_HINT = (
    "For MVTec tasks, set data.root (--data.root) to the folder that holds the category folders "
    "(<root>/<category>/train/good/*.png), or give the task its own 'root'."
)


@dataclass
class TaskSpec:
    """One task of the stream.

    Args:
        name: Unique task name (used in results and checkpoints).
        kind: ``"mvtec"`` (MVTec AD layout) or ``"folder"`` (anomalib ``Folder``).
        category: MVTec category folder; defaults to ``name``.
        root: MVTec: overrides the stream's root for this task. Folder: base
            folder the ``*_dir`` paths are relative to (optional).
        normal_dir: Folder: defect-free training images (searched recursively).
        abnormal_dir: Folder: defective test images.
        mask_dir: Folder: masks of the defective images, same stem (``000.png``
            or ``000_mask.png``) as their image.
        normal_test_dir: Folder: defect-free test images (else 20% of
            ``normal_dir`` is split off for testing).
    """

    name: str
    kind: Literal["mvtec", "folder"] = "mvtec"
    category: str | None = None
    root: str | None = None
    normal_dir: str | None = None
    abnormal_dir: str | None = None
    mask_dir: str | None = None
    normal_test_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("mvtec", "folder"):
            msg = f"Task '{self.name}': unknown kind {self.kind!r}; use 'mvtec' or 'folder'."
            raise ValueError(msg)
        if self.kind == "mvtec" and self.category is None:
            self.category = self.name
        for key in ("root", *_FOLDER_DIRS):  # Path -> str, for configs and checkpoints
            if isinstance(getattr(self, key), Path):
                setattr(self, key, str(getattr(self, key)))

    @classmethod
    def from_value(cls, value: str | Mapping[str, Any] | TaskSpec) -> TaskSpec:
        """Build from a category string, a dict (config) or a ``TaskSpec``."""
        if isinstance(value, TaskSpec):
            return value
        if isinstance(value, str):
            return cls(name=value)
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                msg = f"Task {dict(value)!r}: unknown key(s) {unknown}; allowed keys: {sorted(known)}."
                raise ValueError(msg)
            if "name" not in value:
                msg = f"Task {dict(value)!r} has no 'name'."
                raise ValueError(msg)
            return cls(**value)
        msg = f"A task must be a category name or a dict, got {type(value).__name__}: {value!r}"
        raise TypeError(msg)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict without ``None`` entries (for configs and checkpoints)."""
        return {key: value for key, value in asdict(self).items() if value is not None}


def _images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, as anomalib's ``Folder`` finds them."""
    return [p for p in folder.glob("**/*") if p.suffix.lower() in IMG_EXTENSIONS and not p.is_dir()]


def _check_folder_task(task: TaskSpec) -> None:
    """Raise naming the path when a Folder task cannot be read as anomalib's ``Folder`` would."""
    if task.normal_dir is None:
        msg = "kind 'folder' needs 'normal_dir' (defect-free training images)."
        raise ValueError(msg)
    if task.mask_dir is not None and task.abnormal_dir is None:
        msg = f"'mask_dir' ({task.mask_dir}) is given without 'abnormal_dir'; masks belong to abnormal images."
        raise ValueError(msg)
    root = Path(task.root) if task.root is not None else None
    if root is not None and not root.is_dir():
        msg = f"root folder '{root}' (= {root.resolve()}) does not exist."
        raise FileNotFoundError(msg)
    found: dict[str, list[Path]] = {}
    for key in _FOLDER_DIRS:
        value = getattr(task, key)
        if value is None:
            continue
        folder = (root / value if root is not None else Path(value)).resolve()
        if not folder.is_dir():
            msg = f"{key} '{folder}' does not exist or is not a folder."
            raise FileNotFoundError(msg)
        found[key] = sorted(_images(folder))  # anomalib sorts Path objects the same way
        if not found[key]:
            what = "no training images" if key == "normal_dir" else "no images"
            msg = f"{key} '{folder}' has {what} (extensions {', '.join(IMG_EXTENSIONS)})."
            raise FileNotFoundError(msg)
    if "mask_dir" in found:
        _check_masks(found["abnormal_dir"], found["mask_dir"])


def _check_masks(images: list[Path], masks: list[Path]) -> None:
    """Mirror anomalib's ``make_folder_dataset``: the i-th sorted mask must contain the i-th image's stem."""
    stems = {m.stem for m in masks}
    missing = [p for p in images if p.stem not in stems and f"{p.stem}_mask" not in stems]
    if missing:
        msg = f"{len(missing)} of {len(images)} abnormal images have no mask '<stem>.*' or '<stem>_mask.*' in "
        msg += f"'{masks[0].parent}', e.g. '{missing[0]}' ({len(masks)} masks there, e.g. '{masks[0].name}')."
        raise ValueError(msg)
    if len(images) != len(masks):
        msg = f"{len(images)} abnormal images but {len(masks)} masks in '{masks[0].parent}'; anomalib's Folder "
        raise ValueError(msg + "pairs them one to one, so remove the extra masks.")
    for image, mask in zip(images, masks, strict=True):
        if image.stem not in mask.stem:
            msg = f"anomalib's Folder pairs images and masks in sorted order, and image '{image}' gets mask "
            msg += f"'{mask}'. Use names that sort alike, e.g. zero-padded numbers (000.png / 000_mask.png)."
            raise ValueError(msg)


class TaskStream:
    """Ordered tasks plus the data settings they share.

    Args:
        tasks: Tasks in training order; a string is an MVTec category, a dict
            holds :class:`TaskSpec` fields.
        root: Folder holding the MVTec category folders.
        train_batch_size: Training batch size.
        eval_batch_size: Test batch size.
        num_workers: ``DataLoader`` worker processes.
        seed: Seed for anomalib's data splits (Folder tasks without ``normal_test_dir``).
        threshold_holdout: Fraction of each task's training images held out of its training to fit
            its thresholds (``0``: the thresholds are fitted on the test set). They are normal images
            only, so the image threshold is a high quantile of their scores (``NORMAL_SCORE_QUANTILE``).
    """

    def __init__(
        self,
        tasks: Sequence[str | dict[str, Any]],
        root: str = "./datasets/MVTecAD",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        seed: int | None = None,
        threshold_holdout: float = 0.0,
    ) -> None:
        if not 0.0 <= threshold_holdout < 1.0:
            msg = f"data.threshold_holdout must be in [0, 1) (a fraction of the training images), got {threshold_holdout!r}"
            raise ValueError(msg)
        if isinstance(tasks, str | Mapping):
            tasks = [tasks]
        self.tasks: list[TaskSpec] = [TaskSpec.from_value(task) for task in tasks]
        self.root = str(root)
        self.train_batch_size = train_batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.threshold_holdout = float(threshold_holdout)

    _SETTINGS = ("root", "train_batch_size", "eval_batch_size", "num_workers", "seed")
    _OPTIONAL = ("threshold_holdout",)  # written only when set, so runs from before it resume unchanged

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskStream:
        """Build from a config's ``data:`` section (unknown keys raise ``ValueError``)."""
        unknown = sorted(set(data) - {"tasks", *cls._SETTINGS, *cls._OPTIONAL})
        if unknown:
            msg = f"Unknown key(s) {unknown} in the data section; allowed: {['tasks', *cls._SETTINGS, *cls._OPTIONAL]}."
            raise ValueError(msg)
        if "tasks" not in data:
            msg = "The data section needs 'tasks' (a list of MVTec categories or task dicts)."
            raise ValueError(msg)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Inverse of :meth:`from_dict`."""
        optional = {k: getattr(self, k) for k in self._OPTIONAL if getattr(self, k)}
        return {"tasks": [task.to_dict() for task in self.tasks], **{k: getattr(self, k) for k in self._SETTINGS}, **optional}

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[TaskSpec]:
        return iter(self.tasks)

    def __getitem__(self, index: int) -> TaskSpec:
        return self.tasks[index]

    def __repr__(self) -> str:
        return f"TaskStream(tasks={self.names}, root={self.root!r})"

    @property
    def names(self) -> list[str]:
        """Task names in training order."""
        return [task.name for task in self.tasks]

    @property
    def threshold_split(self) -> str:
        """The images each task's thresholds are fitted on, in words (for the results)."""
        if self.threshold_holdout > 0:
            return (
                f"{self.threshold_holdout:.0%} of the task's training images, held out of its training (normal "
                f"images only: the image threshold is the {NORMAL_SCORE_QUANTILE:g} quantile of their scores)"
            )
        return "the test split (the validation split is the test set): the F1 is measured on the images that fitted it"

    def task_root(self, index: int) -> Path:
        """Root folder of task ``index`` (its own ``root`` or the stream's)."""
        task = self.tasks[index]
        return Path(task.root if task.root is not None else self.root)

    def validate(self) -> None:
        """Check every task's files; raise one error listing all problems.

        Raises:
            ValueError: no tasks, duplicate or unusable names, bad Folder settings or masks.
            FileNotFoundError: when every problem is a missing folder or missing images.
        """
        if not self.tasks:
            msg = "The task stream is empty; list at least one task under data.tasks."
            raise ValueError(msg)
        problems: list[tuple[type[Exception], str]] = []
        seen: dict[str, int] = {}
        mvtec_problem = False
        for index, task in enumerate(self.tasks):
            where = f"MVTec category '{task.category}' in '{self.task_root(index)}'"
            label = f"task {index} '{task.name}' ({where if task.kind == 'mvtec' else 'folder'})"
            if not task.name or "/" in task.name or "\\" in task.name:
                problems.append((ValueError, f"{label}: a task name must be non-empty, without '/' or '\\'."))
            if task.name in seen:
                problems.append((ValueError, f"{label}: duplicate task name (also task {seen[task.name]})."))
            seen.setdefault(task.name, index)
            try:
                if task.kind == "mvtec":
                    check_mvtec_layout(self.task_root(index), str(task.category))
                else:
                    _check_folder_task(task)
            except (OSError, ValueError) as exc:
                text = str(exc)
                mvtec_problem = mvtec_problem or task.kind == "mvtec"
                if task.kind == "mvtec" and _SINGLE_CONFIG_HINT:
                    text = text.replace(" " + _SINGLE_CONFIG_HINT, "").replace(_SINGLE_CONFIG_HINT, "")
                problems.append((type(exc), f"{label}: {text}"))
        if problems:
            kind = FileNotFoundError if all(issubclass(t, FileNotFoundError) for t, _ in problems) else ValueError
            lines = [f"Invalid task stream {self.names}: {len(problems)} problem(s)"]
            lines += [f"  - {text}" for _, text in problems]
            if mvtec_problem:
                lines.append(_ROOT_HINT)
            raise kind("\n".join(lines))

    def datamodule(self, index: int) -> AnomalibDataModule:
        """A fresh anomalib datamodule for task ``index`` (not set up)."""
        task = self.tasks[index]
        common: dict[str, Any] = {
            "train_batch_size": self.train_batch_size,
            "eval_batch_size": self.eval_batch_size,
            "num_workers": self.num_workers,
            "seed": self.seed,
        }
        if self.threshold_holdout > 0:  # the thresholds' images come out of the training set
            common |= {"val_split_mode": ValSplitMode.FROM_TRAIN, "val_split_ratio": self.threshold_holdout}
        if task.kind == "mvtec":
            return protect_workers(MVTecADLocal(root=self.task_root(index), category=str(task.category), **common))
        return protect_workers(Folder(
            name=task.name,
            root=task.root,
            normal_dir=task.normal_dir,
            abnormal_dir=task.abnormal_dir,
            normal_test_dir=task.normal_test_dir,
            mask_dir=task.mask_dir,
            # Evaluate on the whole test set, as for MVTec (Folder's default moves half of it to validation).
            **({"val_split_mode": ValSplitMode.SAME_AS_TEST} | common),
        ))
