"""MVTec AD datamodule that only ever reads a local copy of the dataset.

anomalib's :class:`anomalib.data.MVTecAD` downloads the whole dataset (about
5 GB) whenever ``root/category`` is not a folder, so a typo in ``--data.root``
or ``--data.category`` turns into a long download or, offline, into a network
error (``Name or service not known``) that says nothing about the path.
:class:`MVTecADLocal` never downloads. It checks the folder layout before
anything reads it and raises :class:`FileNotFoundError` naming the path, what
is missing, and how to point ``--data.root`` at an MVTec AD folder. A file that
cannot be decoded raises :class:`ImageReadError` naming the file, also from
inside ``DataLoader`` worker processes.

Example:
    >>> from anomalib_moleflow.data import MVTecADLocal
    >>> datamodule = MVTecADLocal(root="../shared/data/mvtec_ad", category="bottle")
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from anomalib.data import MVTecAD
from anomalib.data.datasets.image.mvtecad import (
    CATEGORIES,
    IMG_EXTENSIONS,
    MVTecADDataset,
)
from anomalib.data.utils import Split, TestSplitMode, ValSplitMode
from torchvision.transforms.v2 import Transform

logger = logging.getLogger(__name__)

__all__ = ["MVTEC_AD_CATEGORIES", "ImageReadError", "MVTecADLocal", "MVTecADLocalDataset", "check_mvtec_layout"]

#: The 15 categories of the official MVTec AD dataset.
MVTEC_AD_CATEGORIES: tuple[str, ...] = tuple(CATEGORIES)

_LAYOUT_HELP = (
    "MVTec AD layout: <root>/<category>/train/good/*.png (defect-free training images), "
    "<root>/<category>/test/<good|defect_type>/*.png and "
    "<root>/<category>/ground_truth/<defect_type>/*_mask.png."
)
_ROOT_HELP = (
    "Point --data.root (or `root:` under `data.init_args` in the config) at the folder that holds the "
    "category folders, e.g. `--data.root /path/to/mvtec_ad` where /path/to/mvtec_ad/bottle/train/good exists. "
    "This datamodule never downloads the dataset."
)


class ImageReadError(OSError):
    """An image or mask file of the dataset could not be read or decoded.

    The message always names the file. Takes a single message argument, so that
    PyTorch's ``DataLoader`` can re-raise it (message included) in the main
    process when it happens inside a worker.
    """


def _describe(path: Path) -> str:
    """``'given' (= /absolute/path)`` when the two differ, else ``'path'``."""
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError):  # pragma: no cover - unusual file systems
        return f"'{path}'"
    return f"'{path}'" if resolved == path else f"'{path}' (= {resolved})"


def _pngs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMG_EXTENSIONS)
    except OSError:
        return []


def _category_folders(root: Path) -> list[str]:
    """Names of the sub-folders of ``root`` that look like MVTec AD categories."""
    try:
        return sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    except OSError:
        return []


def check_mvtec_layout(
    root: str | Path,
    category: str,
    test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
) -> Path:
    """Check that ``root/category`` is a readable MVTec AD category folder.

    Only the file system is inspected, nothing is downloaded.

    Args:
        root: Folder that holds the category folders.
        category: Category folder name; one of the 15 MVTec AD categories or
            a custom product in the same layout.
        test_split_mode: With ``"from_dir"`` (anomalib's default) the ``test``
            folder must hold images too, and every defect type needs its masks.

    Returns:
        The category folder.

    Raises:
        FileNotFoundError: naming the path and what is missing.
    """
    root = Path(root)
    category_dir = root / category

    if not root.exists():
        msg = f"MVTec AD root folder {_describe(root)} does not exist. {_ROOT_HELP}"
        raise FileNotFoundError(msg)
    if not root.is_dir():
        msg = f"MVTec AD root {_describe(root)} is not a folder. {_ROOT_HELP}"
        raise FileNotFoundError(msg)

    if not category_dir.is_dir():
        found = _category_folders(root)
        found_txt = (
            f"Category folders found in that root: {', '.join(found)}."
            if found
            else "No category folders (with train/good inside) were found in that root."
        )
        if category in MVTEC_AD_CATEGORIES:
            msg = (
                f"MVTec AD category '{category}' not found: looked for the folder {_describe(category_dir)}, "
                f"which does not exist. {found_txt} {_ROOT_HELP}"
            )
        else:
            msg = (
                f"Unknown category '{category}': it is not one of the 15 MVTec AD categories "
                f"({', '.join(MVTEC_AD_CATEGORIES)}), and the folder {_describe(category_dir)} for a custom "
                f"category does not exist. A custom category is accepted when its folder exists in "
                f"{_LAYOUT_HELP} {found_txt} {_ROOT_HELP}"
            )
        raise FileNotFoundError(msg)

    train_good = category_dir / "train" / "good"
    if not train_good.is_dir():
        msg = (
            f"Category folder {_describe(category_dir)} has no 'train/good' folder: looked for "
            f"{_describe(train_good)}. Expected {_LAYOUT_HELP} {_ROOT_HELP}"
        )
        raise FileNotFoundError(msg)
    if not _pngs(train_good):
        msg = (
            f"No training images: the folder {_describe(train_good)} holds no .png files "
            f"(MVTec AD images are PNG; other formats are not read). Expected {_LAYOUT_HELP}"
        )
        raise FileNotFoundError(msg)

    if TestSplitMode(test_split_mode) == TestSplitMode.FROM_DIR:
        _check_test_folders(category_dir)
    return category_dir


def _check_test_folders(category_dir: Path) -> None:
    test_dir = category_dir / "test"
    hint = "or set --data.test_split_mode synthetic (or none) to run without a test folder."
    type_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir()) if test_dir.is_dir() else []
    if not any(_pngs(d) for d in type_dirs):
        msg = (
            f"No test images: looked for .png files in {_describe(test_dir)}/<good|defect_type>/. "
            f"Expected {_LAYOUT_HELP} Add the test folder, {hint}"
        )
        raise FileNotFoundError(msg)
    for type_dir in type_dirs:
        if type_dir.name == "good":
            continue
        n_images = len(_pngs(type_dir))
        mask_dir = category_dir / "ground_truth" / type_dir.name
        n_masks = len(_pngs(mask_dir))
        if n_images and n_images != n_masks:
            msg = (
                f"Defect type '{type_dir.name}' has {n_images} test images in {_describe(type_dir)} but "
                f"{n_masks} masks in {_describe(mask_dir)}; every defective test image needs a mask "
                f"(<name>_mask.png). Expected {_LAYOUT_HELP}"
            )
            raise FileNotFoundError(msg)


def _read_failure(path: str | None) -> BaseException | None:
    """The error raised when fully decoding ``path``, or ``None`` if it decodes."""
    if not path:
        return None
    from PIL import Image  # anomalib reads images with PIL as well

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        return exc
    return None


class MVTecADLocalDataset(MVTecADDataset):
    """:class:`~anomalib.data.datasets.MVTecADDataset` whose read errors name the file.

    anomalib's ``AnomalibDataset.__getitem__`` reads the image (and, for
    defective test images, the mask) with PIL through
    :func:`anomalib.data.utils.read_image` / ``read_mask``; a truncated or
    corrupt PNG then fails with a PIL message that may not name the file
    (``image file is truncated``). Sample loading is wrapped here, the one place
    that knows the sample's paths: on failure the image and mask are decoded
    again to find the culprit, and :class:`ImageReadError` names it. Other
    errors (e.g. from augmentations) keep their type and get a note with the
    sample's paths.
    """

    def __getitem__(self, index: int) -> Any:  # noqa: ANN401 - anomalib's DatasetItem
        try:
            return super().__getitem__(index)
        except Exception as exc:
            try:
                row = self.samples.iloc[index]
            except Exception:  # noqa: BLE001 - bad index: let the original error through
                raise exc from None
            image_path = str(row.image_path)
            mask_path = row.mask_path if isinstance(row.mask_path, str) and row.mask_path else None
            split = getattr(self.split, "value", self.split)
            for kind, path in (("image", image_path), ("mask", mask_path)):
                failure = _read_failure(path)
                if failure is not None:
                    msg = (
                        f"Cannot read {kind} file '{path}' (sample {index} of the {split} split of "
                        f"'{self.category}'): {type(failure).__name__}: {failure}. The file is missing, "
                        f"unreadable or not a valid image; replace it or remove it from the dataset folder."
                    )
                    raise ImageReadError(msg) from exc
            if hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note(f"while loading sample {index}: image '{image_path}', mask '{mask_path}'")
            raise


class MVTecADLocal(MVTecAD):
    """MVTec AD datamodule for a local copy of the dataset; never downloads.

    Same arguments and behaviour as :class:`anomalib.data.MVTecAD`, except:

    * ``prepare_data`` and ``setup`` check the folder layout first (see
      :func:`check_mvtec_layout`) and raise :class:`FileNotFoundError` naming
      the path instead of downloading;
    * ``category`` may be a custom product folder in MVTec AD layout;
    * a corrupt image or mask raises :class:`ImageReadError` naming the file.

    Args:
        root: Folder that holds the category folders (e.g. ``bottle/``).
        category: MVTec AD category, or the name of a custom category folder in
            the same layout.
        train_batch_size: Training batch size.
        eval_batch_size: Validation and test batch size.
        num_workers: Number of ``DataLoader`` worker processes.
        train_augmentations: Augmentations for training images.
        val_augmentations: Augmentations for validation images.
        test_augmentations: Augmentations for test images.
        augmentations: Augmentations for any split without its own.
        test_split_mode: How the test set is made (``from_dir``, ``synthetic``, ``none``).
        test_split_ratio: Fraction of the data used for testing when split off.
        val_split_mode: How the validation set is made.
        val_split_ratio: Fraction of the data used for validation when split off.
        seed: Seed for the splits.
    """

    def __init__(
        self,
        root: Path | str = "./datasets/MVTecAD",
        category: str = "bottle",
        train_batch_size: int = 32,
        eval_batch_size: int = 32,
        num_workers: int = 8,
        train_augmentations: Transform | None = None,
        val_augmentations: Transform | None = None,
        test_augmentations: Transform | None = None,
        augmentations: Transform | None = None,
        test_split_mode: TestSplitMode | str = TestSplitMode.FROM_DIR,
        test_split_ratio: float = 0.2,
        val_split_mode: ValSplitMode | str = ValSplitMode.SAME_AS_TEST,
        val_split_ratio: float = 0.5,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            root=root,
            category=category,
            train_batch_size=train_batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            train_augmentations=train_augmentations,
            val_augmentations=val_augmentations,
            test_augmentations=test_augmentations,
            augmentations=augmentations,
            test_split_mode=test_split_mode,
            test_split_ratio=test_split_ratio,
            val_split_mode=val_split_mode,
            val_split_ratio=val_split_ratio,
            seed=seed,
        )

    def check_layout(self) -> Path:
        """Check the dataset folder; see :func:`check_mvtec_layout`."""
        return check_mvtec_layout(self.root, self.category, self.test_split_mode)

    def prepare_data(self) -> None:
        """Check that the dataset is on disk. Never downloads."""
        category_dir = self.check_layout()
        logger.info("Using the local MVTec AD category folder %s", category_dir)

    def _setup(self, _stage: str | None = None) -> None:
        # setup() may run without prepare_data() (e.g. on other ranks, or when
        # called by hand), so the layout is checked here too before reading.
        self.check_layout()
        self.train_data = MVTecADLocalDataset(split=Split.TRAIN, root=self.root, category=self.category)
        self.test_data = MVTecADLocalDataset(split=Split.TEST, root=self.root, category=self.category)
