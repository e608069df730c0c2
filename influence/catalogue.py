"""The training catalogue: what names a training image in the outputs (its key, file and label) and
the class names. A small value object handed to the writers and the report instead of four lists."""
import dataclasses

import numpy as np

from influence.data.classes import imagenet_classes


class NameList:
    """index -> ``names[index]`` (the index as text outside the list); picklable for the writer processes."""

    def __init__(self, names):
        self.names = list(names)

    def __call__(self, i):
        i = int(i)
        return self.names[i] if 0 <= i < len(self.names) else str(i)


def class_namer(classmap, num_classes):
    """index -> human name: labels.json first, ImageNet names for 1000-way models, else the index."""
    if classmap is not None:
        return classmap.human
    if num_classes == 1000:
        return NameList([human for _, human in imagenet_classes()])
    return str


@dataclasses.dataclass
class TrainCatalogue:
    """Every training image in archive order: ``keys`` (``"<batch>_<i>"``), ``files``, ``labels``, and
    ``namer`` (class index -> name, picklable). Made once per run and read for every test image, so its
    fields are normalised here: ``keys`` a list of str, ``files`` and ``labels`` flat arrays."""

    keys: list
    files: np.ndarray
    labels: np.ndarray
    namer: object = str

    def __post_init__(self):
        self.keys = [str(key) for key in np.asarray(self.keys).tolist()]
        self.files = np.asarray(self.files).reshape(-1)
        self.labels = np.asarray(self.labels).reshape(-1)

    @classmethod
    def of(cls, train, namer=str):
        """The catalogue of a :class:`influence.data.archive_reader.TrainArchive`."""
        return cls([k for b in train.batches for k in train.keys(b)], train.files(), train.labels(), namer)

    def __len__(self):
        return len(self.keys)
