"""Apply a function to every case of a dataset, in worker processes when asked, with a progress bar.

Shared by dataset validation, fingerprinting and evaluation, which read one case per call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.context import BaseContext
from typing import TypeVar

from medseg.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")


def map_cases(
    fn: Callable[[T], R],
    items: Sequence[T],
    num_workers: int = 1,
    desc: str = "",
    progress: bool = True,
    mp_context: BaseContext | None = None,
) -> list[R]:
    """``[fn(item) for item in items]``, computed by up to ``num_workers`` processes.

    Args:
        fn: called once per item; with more than one worker it must be picklable (a module-level
            function or a ``functools.partial`` of one), as must items and results.
        items: the work, one item per case.
        num_workers: processes to use, at most one per item; 1 or fewer runs in this process.
        desc: label of the tqdm progress bar (one step per item).
        progress: show the progress bar.
        mp_context: multiprocessing context of the worker pool (e.g. ``spawn``); the default one if None.

    Returns:
        the results in the order of ``items``.

    Raises:
        whatever ``fn`` raises, for the first failing item in order.
    """
    workers = max(1, min(int(num_workers), len(items)))
    bar = progress_bar(total=len(items), desc=desc, unit="case", disable=not progress)
    results: list[R] = []
    try:
        if workers == 1:
            for item in items:
                results.append(fn(item))
                bar.update()
        else:
            chunk = max(1, len(items) // (workers * 8))
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp_context) as pool:
                for res in pool.map(fn, items, chunksize=chunk):
                    results.append(res)
                    bar.update()
    finally:
        bar.close()
    return results
