"""Continual-learning metrics from per-step, per-task correct/total counts.

After step t (0-based) the model is tested on the test images of every task j <= t. ``R[t][j]`` is
the accuracy (%) on task j's test images after step t (its classes, or its domain), keyed by task
index. All numbers are percentages.

Class-incremental predictions are the argmax over every class seen; task-incremental ones (the task
known at test time) the argmax over the image's own task's classes, from the same logits.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def correct_predictions(logits: torch.Tensor, labels: torch.Tensor, task_classes: range) -> tuple[int, int]:
    """Correct class-incremental and task-incremental predictions of ``logits`` ([N, classes seen]) for
    images of one task whose classes are ``task_classes``."""
    task_logits = logits[:, task_classes.start:task_classes.stop]
    class_il = int((logits.argmax(1) == labels).sum())
    task_il = int((task_logits.argmax(1) + task_classes.start == labels).sum())
    return class_il, task_il


@dataclass
class Evaluation:
    """One evaluation step's counts: per task seen, correct class-incremental and task-incremental predictions
    and test images; per class (label), correct class-incremental predictions and test images."""

    correct: list[int] = field(default_factory=list)
    task_correct: list[int] = field(default_factory=list)
    total: list[int] = field(default_factory=list)
    class_correct: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    class_total: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def add_task(self, logits: torch.Tensor, labels: torch.Tensor, task_classes: range) -> None:
        class_il, task_il = correct_predictions(logits, labels, task_classes)
        self.correct.append(class_il)
        self.task_correct.append(task_il)
        self.total.append(len(labels))
        hits = (logits.argmax(1) == labels).numpy()
        classes = logits.shape[1]
        self.class_correct = self._grown(self.class_correct, classes) + np.bincount(labels.numpy(), hits, classes).astype(np.int64)
        self.class_total = self._grown(self.class_total, classes) + np.bincount(labels.numpy(), minlength=classes)

    @staticmethod
    def _grown(counts: np.ndarray, size: int) -> np.ndarray:
        return np.pad(counts, (0, size - len(counts)))

    def per_class_accuracy(self, class_names: list[str]) -> dict[str, float]:
        """Accuracy (%) of each class with test images, by name."""
        return {class_names[c]: 100.0 * float(self.class_correct[c]) / int(self.class_total[c])
                for c in np.flatnonzero(self.class_total)}


class AccuracyMatrix:
    """Accumulates the counts of each evaluation step and derives every metric from them."""

    def __init__(self, correct: list[list[int]] | None = None, total: list[list[int]] | None = None):
        self.correct: list[list[int]] = [list(row) for row in correct or []]
        self.total: list[list[int]] = [list(row) for row in total or []]

    def add_step(self, correct: list[int], total: list[int]) -> None:
        step = len(self.correct)
        if len(correct) != step + 1 or len(total) != step + 1:
            raise ValueError(f"step {step} needs counts for tasks 0..{step}, got {len(correct)}")
        self.correct.append([int(c) for c in correct])
        self.total.append([int(n) for n in total])

    @property
    def num_steps(self) -> int:
        return len(self.correct)

    def matrix(self) -> np.ndarray:
        """R[t][j] in %, NaN for tasks not yet seen (j > t)."""
        steps = self.num_steps
        r = np.full((steps, steps), np.nan)
        for t in range(steps):
            r[t, : t + 1] = 100.0 * np.asarray(self.correct[t]) / np.maximum(self.total[t], 1)
        return r

    def accuracy(self, step: int) -> float:
        """A_t: accuracy over all test images of the classes seen after ``step``."""
        return 100.0 * sum(self.correct[step]) / max(sum(self.total[step]), 1)

    def curve(self) -> list[float]:
        return [self.accuracy(t) for t in range(self.num_steps)]

    def average_incremental(self) -> float:
        """Ā: mean of A_t over the steps so far."""
        return float(np.mean(self.curve()))

    def last(self) -> float:
        return self.accuracy(self.num_steps - 1)

    def old_accuracy(self, step: int) -> float:
        """Accuracy on the classes of tasks before ``step`` (NaN at step 0)."""
        total = sum(self.total[step][:step])
        return 100.0 * sum(self.correct[step][:step]) / total if total else float("nan")

    def new_accuracy(self, step: int) -> float:
        """Accuracy on the classes of task ``step`` itself."""
        return 100.0 * self.correct[step][step] / max(self.total[step][step], 1)

    def task_forgetting(self, step: int | None = None) -> list[float]:
        """f_j = max over earlier steps l in [j, step) of R[l][j], minus R[step][j], for j < step."""
        step = self.num_steps - 1 if step is None else step
        r = self.matrix()
        return [float(np.max(r[j:step, j]) - r[step, j]) for j in range(step)]

    def forgetting(self, step: int | None = None) -> float:
        """Mean forgetting over the tasks before ``step`` (Chaudhry et al., 2018); NaN at step 0."""
        values = self.task_forgetting(step)
        return float(np.mean(values)) if values else float("nan")

    def backward_transfer(self, step: int | None = None) -> float:
        """BWT = mean over j < step of R[step][j] - R[j][j] (Lopez-Paz & Ranzato, 2017)."""
        step = self.num_steps - 1 if step is None else step
        r = self.matrix()
        values = [r[step, j] - r[j, j] for j in range(step)]
        return float(np.mean(values)) if values else float("nan")

    def step_summary(self, step: int) -> dict[str, float]:
        return {
            "accuracy": self.accuracy(step),
            "average_incremental_accuracy": float(np.mean(self.curve()[: step + 1])),
            "old_accuracy": self.old_accuracy(step),
            "new_accuracy": self.new_accuracy(step),
            "forgetting": self.forgetting(step),
            "backward_transfer": self.backward_transfer(step),
        }

    def to_dict(self) -> dict:
        return {"correct": self.correct, "total": self.total}
