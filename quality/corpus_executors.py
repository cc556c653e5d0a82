"""Who runs pass 1 of a corpus scoring run (`corpus_work.score_unit` over the units not yet done): a table.

- `local`: spawned worker processes on this machine (`--workers N`; 0: this process), as `prunefusion score` always
  did;
- `ray`: Ray Data over a local Ray (`ray.init(num_cpus=N)`, bound to 127.0.0.1) or an existing cluster
  (`--address auto` or ray://HOST:10001): the units are a dataset of one row each, `map_batches` runs them on a pool
  of N actors (one CPU each), each actor holding one scorer (its spaCy vocabulary, and its ONNX MiniLM session when
  SemDeDup needs embeddings) for every unit it is given. Workers read their units' byte and row ranges and write
  their results into the work folder themselves, so on a cluster the inputs and the work folder must be on storage
  every node mounts (NFS, a PVC with ReadWriteMany, a FUSE-mounted bucket).

Both call `on_done(summary)` in the driver as each unit finishes (any order), which drives the progress bar, and
raise a worker's ValueError or OSError (a bad record, a missing file) in the driver, with its message.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
from collections.abc import Callable

from prunefusion.quality.corpus_sources import Unit
from prunefusion.quality.corpus_work import ScoringJob, score_unit
from prunefusion.quality.pipeline import scoring_executor

OnDone = Callable[[dict], None]
MAX_RESTARTS = 2  # an actor killed mid-unit (out of memory, a node lost) restarts and retries: this often, not forever


def run_local(units: list[Unit], job: ScoringJob, workers: int, address: str | None, on_done: OnDone) -> None:
    from concurrent.futures import as_completed

    if address:
        raise ValueError("--address is for --executor ray")
    executor = scoring_executor(workers)
    try:
        for future in as_completed([executor.submit(score_unit, u.to_dict(), job) for u in units]):
            on_done(future.result())
    finally:
        executor.shutdown(cancel_futures=True)


class RayUnitScorer:
    """A Ray Data actor: scores the units of its batches (one per batch) with the job it was built with."""

    def __init__(self, job: ScoringJob) -> None:
        self.job = job

    def __call__(self, batch: dict) -> dict:
        return {"summary": [json.dumps(self._score(json.loads(u))) for u in batch["unit"]]}

    def _score(self, unit: dict) -> dict:
        try:
            return score_unit(unit, self.job)
        except (ValueError, OSError) as err:  # bad input: reported to the driver as data (Ray would wrap it twice)
            return {"error": str(err)}


def _ray(local: bool):
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports sent out
    if local:  # a local Ray on 127.0.0.1: Ray's own switch (read at import) for a single-node Ray on loopback
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        import ray
        import ray.data
        from ray._private import ray_constants
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'prunefusion[ray]'") from None
    if local and ray_constants.ENABLE_RAY_CLUSTER:
        logging.getLogger(__name__).warning("Ray was imported before this run: the local Ray binds to the node's "
                                            "address, not 127.0.0.1")
    return ray


def run_ray(units: list[Unit], job: ScoringJob, workers: int, address: str | None, on_done: OnDone) -> None:
    if workers < 1:
        raise ValueError(f"--executor ray needs --workers >= 1 (Ray actors), got {workers}")
    address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit`: that cluster
    ray = _ray(local=not address)
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(**({"address": address} if address else {"num_cpus": workers}), include_dashboard=False,
                 logging_level=logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the caller's bar counts documents
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # else: a warning that its own bars are off
    try:
        rows = [{"unit": json.dumps(u.to_dict())} for u in units]
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
        scored = dataset.map_batches(RayUnitScorer, fn_constructor_args=(job,), batch_size=1, num_cpus=1,
                                     compute=ray.data.ActorPoolStrategy(size=workers), max_restarts=MAX_RESTARTS,
                                     max_task_retries=MAX_RESTARTS)
        # closed before ray.shutdown(), also when a unit's error ends the loop early: Ray Data's prefetch and
        # streaming-executor threads must be gone first, or one that touches the shut-down core worker makes Ray
        # exit the whole process ("The core worker has already been shutdown ... The process will exit": it took
        # pytest with it once in CI)
        with contextlib.closing(iter(scored.iter_rows())) as rows_out:
            for row in rows_out:
                summary = json.loads(row["summary"])
                if "error" in summary:
                    raise ValueError(summary["error"])
                on_done(summary)
    finally:
        if started_here:
            dataset = scored = rows_out = None  # noqa: F841 (drop the last references to the executor)
            gc.collect()
            ray.shutdown()


EXECUTORS: dict[str, Callable[[list[Unit], ScoringJob, int, str | None, OnDone], None]] = {
    "local": run_local,
    "ray": run_ray,
}
