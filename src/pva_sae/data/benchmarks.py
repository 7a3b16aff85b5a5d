"""The benchmark switch: ``data.dataset`` selects the task loader.

Both loaders return tasks with the same fields (``task_id``, ``text``, ``test_list``, ``code``,
``complexity``, ``difficulty``...), so the splits of :mod:`pva_sae.data.mbpp` (stratified by
complexity), the prompts and every stage treat MBPP and HumanEval alike. What differs is how a
program is labelled: :func:`pva_sae.execution.label.exec_job`.
"""

from __future__ import annotations

from pva_sae.config import DATASETS
from pva_sae.data import humaneval, mbpp
from pva_sae.data.mbpp import DataError

_LOADERS = {"mbpp": mbpp, "humaneval": humaneval}


def _module(dataset: str):
    if dataset not in _LOADERS:
        raise DataError(f"data.dataset {dataset!r} is not a benchmark of pva-sae; use one of {', '.join(DATASETS)}")
    return _LOADERS[dataset]


def load_tasks(dataset: str, source: str = "packaged") -> list:
    """Every task of benchmark ``dataset`` from ``source`` ('packaged', 'hub' or a file), sorted by task id."""
    return _module(dataset).load_tasks(source)


def dataset_sha256(dataset: str, source: str = "packaged") -> str:
    """sha256 of the benchmark's source, recorded in the run manifest."""
    return _module(dataset).dataset_sha256(source)
