"""A progress bar over the tasks of a continual run (tqdm, shipped with Lightning's deps)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from tqdm.auto import tqdm


def task_progress(tasks: Iterable[int], names: Sequence[str], done: int = 0) -> Iterator[int]:
    """Yield task indices while showing ``task i/N: name`` with a bar over all tasks."""
    bar = tqdm(total=len(names), initial=done, desc="continual", unit="task", dynamic_ncols=True)
    try:
        for task in tasks:
            bar.set_postfix_str(f"{names[task]}")
            yield task
            bar.update(1)
    finally:
        bar.close()
