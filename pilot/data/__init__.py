"""Datasets, transforms and the class-incremental task stream."""
from pilot.data.datasets import DATASETS, ImageSet, SourceDataset, load_dataset
from pilot.data.stream import Split, Task, TaskStream, class_order, task_sizes
from pilot.data.transforms import DataConfig, eval_transform, train_transform

__all__ = ["DATASETS", "DataConfig", "ImageSet", "SourceDataset", "Split", "Task", "TaskStream",
           "class_order", "eval_transform", "load_dataset", "task_sizes", "train_transform"]
