"""Data path: CSV + image folders -> decoded uint8 cache -> device batches."""

from fakeprint.data.cache import SplitData, load_split
from fakeprint.data.dataset import IMAGE_SIZE, Problem, check_dataset, read_csv, stratified_split

__all__ = ["IMAGE_SIZE", "Problem", "SplitData", "check_dataset", "load_split", "read_csv", "stratified_split"]
