"""The data path: readers, the datasets pipeline (TaskData), and fixed-shape batching."""

from mtl.data.batching import DEFAULT_BUCKETS, Batcher, TrainStream, bucket_lengths, eval_batches
from mtl.data.pipeline import TaskData, check_max_length, load_raw_splits, load_task_data

__all__ = [
    "DEFAULT_BUCKETS",
    "Batcher",
    "TaskData",
    "TrainStream",
    "bucket_lengths",
    "check_max_length",
    "eval_batches",
    "load_raw_splits",
    "load_task_data",
]
