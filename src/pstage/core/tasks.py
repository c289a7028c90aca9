"""What is predicted: the final classes, and the heads (sub-tasks) each class decomposes into.

The mask task has 18 classes = mask(3) x gender(2) x age(3), label = mask*6 + gender*3 + age.
A generic task (image folder, CSV) has one head whose classes are the final classes. Every run
stores probabilities over the final classes, whatever heads its model has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MASK_NAMES = ["wear", "incorrect", "not_wear"]
GENDER_NAMES = ["male", "female"]


@dataclass(frozen=True)
class Task:
    """Final classes plus, per head, the head class of every final class."""

    name: str
    classes: list[str]
    heads: dict[str, list[str]]
    class_to_head: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def has_subtasks(self) -> bool:
        """True when the classes decompose into several heads (multi-head models, per-task F1)."""
        return len(self.heads) > 1

    def head_targets(self, targets: np.ndarray) -> dict[str, np.ndarray]:
        """Per-head class ids of final class ids."""
        return {h: np.asarray(self.class_to_head[h])[np.asarray(targets)] for h in self.heads}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.classes, "heads": self.heads, "class_to_head": self.class_to_head}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Task:
        return cls(values["name"], list(values["classes"]), dict(values["heads"]), dict(values["class_to_head"]))


def age_bucket_names(thresholds: tuple[int, int]) -> list[str]:
    young, old = thresholds
    return [f"<{young}", f"{young}-{old - 1}", f">={old}"]


def age_bucket(age: np.ndarray | int, thresholds: tuple[int, int]) -> np.ndarray:
    """0 below the first threshold, 1 between, 2 at or above the second."""
    return np.digitize(np.asarray(age), list(thresholds))


def mask_task(age_thresholds: tuple[int, int] = (30, 60)) -> Task:
    ages = age_bucket_names(age_thresholds)
    classes, to_head = [], {"mask": [], "gender": [], "age": []}
    for m, mask in enumerate(MASK_NAMES):
        for g, gender in enumerate(GENDER_NAMES):
            for a, age in enumerate(ages):
                classes.append(f"{mask}/{gender}/{age}")
                to_head["mask"].append(m)
                to_head["gender"].append(g)
                to_head["age"].append(a)
    heads = {"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": ages}
    return Task("mask", classes, heads, to_head)


def mask_label(mask: np.ndarray, gender: np.ndarray, age_bucket_: np.ndarray) -> np.ndarray:
    return np.asarray(mask) * 6 + np.asarray(gender) * 3 + np.asarray(age_bucket_)


def label_task(classes: list[str]) -> Task:
    """A single-head task over named classes (image folder, CSV)."""
    return Task("label", list(classes), {"label": list(classes)}, {"label": list(range(len(classes)))})


MASK_STEMS = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}

GENDERS = {"male": 0, "female": 1}
