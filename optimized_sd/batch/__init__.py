"""Batches of generations from a job file, run in this process or fanned out over Ray actors.

Composes `pipelines/` (pipelines never import it); imports neither click nor tqdm, and Ray only when asked."""

from optimized_sd.batch.driver import BatchProgress, BatchReport, LocalPool, run_batch
from optimized_sd.batch.jobs import BatchJob, read_jobs
from optimized_sd.batch.worker import BatchWorker, LoadSpec

__all__ = ["BatchJob", "BatchProgress", "BatchReport", "BatchWorker", "LoadSpec", "LocalPool", "read_jobs", "run_batch"]
