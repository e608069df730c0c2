"""What a calculate run scores: every test image of its folders (:class:`TestItem`, in folder, label,
number order, ``limit`` applied), those still to do (a resumed run skips the images whose outputs are
complete), and per folder its labels, predictions and images (:class:`TestFolder`, :class:`TestSet`)."""
import dataclasses
from pathlib import Path

import numpy as np

from influence.outputs.report import TestImage, outputs_complete


@dataclasses.dataclass
class TestItem:
    """One test image to score: ``n`` counts from 1 within its (folder, label), as the original did."""

    __test__ = False

    folder: str
    label: int
    n: int
    index: int           # position in the folder's arrays

    @property
    def ident(self):
        return (self.folder, self.label, self.n)


@dataclasses.dataclass
class TestFolder:
    """One test folder: labels, predicted classes, confidences, files; its images only while some
    of them are still to do (else None)."""

    __test__ = False

    labels: np.ndarray
    preds: np.ndarray
    confs: np.ndarray
    files: np.ndarray
    images: np.ndarray = None


@dataclasses.dataclass
class TestSet:
    """Every test image of the run (``items``), those still to do (``todo``), and per folder its
    :class:`TestFolder` (after :func:`influence.engine.predict`)."""

    __test__ = False

    items: list
    todo: list
    folders: dict = dataclasses.field(default_factory=dict)

    def test_image(self, it):
        """Test image ``it`` with its label, prediction, confidence and file (a :class:`TestImage`)."""
        f, i = self.folders[it.folder], it.index
        return TestImage(f.images[i], int(f.labels[i]), int(f.preds[i]), float(f.confs[i]), str(f.files[i]))

    def arrays(self, group):
        """uint8 images (T, H, W, C) and int64 labels (T,) of the test images ``group``."""
        return self.view(group)[:len(group)], self.labels(group)

    def labels(self, group):
        """int64 labels (T,) of the test images ``group``."""
        return np.array([self.folders[it.folder].labels[it.index] for it in group], np.int64)

    def view(self, group):
        """The images of ``group`` as :meth:`influence.Influence.score_groups` reads them: ``len`` and
        slices stacked on demand (a group's images at a time, not the whole run's)."""
        return _Images(self, list(group))


class _Images:
    """``len`` and ``[a:b]`` -> uint8 (b - a, H, W, C): the test images of a list of items, stacked per slice."""

    def __init__(self, tests, items):
        self.tests, self.items = tests, items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, sl):
        return np.stack([self.tests.folders[it.folder].images[it.index] for it in self.items[sl]])


def list_test_items(test, folders, settings):
    """Every test image of the run in folder, label, number order, and those still to do."""
    items, todo = [], []
    for folder in folders:
        y = test.labels(folder)
        for label in np.unique(y):
            members = np.nonzero(y == label)[0]
            if settings.limit:
                members = members[:settings.limit]
            label_dir = Path(settings.out) / folder / str(int(label))
            for n, i in enumerate(members, start=1):
                item = TestItem(folder, int(label), n, int(i))
                items.append(item)
                if settings.overwrite or not outputs_complete(label_dir, n, settings.save_format, settings.figures):
                    todo.append(item)
    return items, todo


def list_tests(test, folders, settings):
    """The :class:`TestSet` of the run (its folders filled in by :func:`influence.engine.predict`)."""
    return TestSet(*list_test_items(test, folders, settings))
