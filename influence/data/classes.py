"""Class-name <-> index maps and ``labels.json``.

Two kinds of map:

* ``imagenet``: every train subfolder is an ImageNet-1k wnid (``n01440764``...). Each class gets
  its canonical ImageNet index (0-999, the order of Keras' ``imagenet_class_index.json``), so a
  train folder holding only a few ImageNet classes still lines up with the outputs of a model
  trained on ImageNet (VGG16 etc.). :meth:`ClassMap.human` knows all 1000 human names.
* ``folders``: any other set of folder names. A class's index is its position among the sorted
  folder names -- except when every name is a non-negative integer (``0``, ``1``, ... ``10``):
  then the class order decides (``order``):

  - ``numeric`` (the default): the index is the integer itself, so that ``10`` does not sort
    before ``2`` and test subfolders named by index mean the same class;
  - ``keras``: the index is the position among the names sorted as text (``0``, ``1``, ``10``,
    ``2``, ...), as Keras' ``image_dataset_from_directory`` numbers class folders.

  :func:`order_conflicts` lists the classes on which the two orders disagree.

``labels.json``::

    {"kind": "imagenet" | "folders",
     "digest": "<16 hex digits, see ClassMap.digest>",
     "classes": [{"index": 0, "name": "n01440764", "human": "tench"}, ...]}

lists only the classes present in the train folder, sorted by index.
"""
import functools
import hashlib
import json
import os
import re

from influence.errors import UserError

_WNID = re.compile(r"^n\d{8}$")
_INDEX = re.compile(r"^\d+$")
KINDS = ("imagenet", "folders")
ORDERS = ("numeric", "keras")


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """The 1000 ImageNet-1k classes as a tuple of ``(wnid, human_name)`` in index order."""
    path = os.path.join(os.path.dirname(__file__), "imagenet_classes.json")
    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)
    return tuple((str(w), str(h)) for w, h in rows)


@functools.lru_cache(maxsize=1)
def _imagenet_index():
    return {wnid: i for i, (wnid, _) in enumerate(imagenet_classes())}


def is_imagenet_wnid(name):
    """True if ``name`` is one of the 1000 ImageNet-1k wnids."""
    return bool(_WNID.match(name)) and name in _imagenet_index()


class ClassMap:
    """Map between class names (train subfolder names) and the model's output indices.

    Build with :meth:`from_train_folder_names` or :meth:`load`; ``kind`` is ``"imagenet"`` or
    ``"folders"``.
    """

    def __init__(self, kind, classes):
        """``classes``: iterable of ``(index, name, human)``; indices and names must be unique."""
        if kind not in KINDS:
            raise ValueError(f"unknown class-map kind {kind!r}")
        self.kind = kind
        rows = sorted((int(i), str(n), str(h)) for i, n, h in classes)
        self._by_index = {i: (n, h) for i, n, h in rows}
        self._by_name = {n: i for i, n, _ in rows}
        if len(self._by_index) != len(rows) or len(self._by_name) != len(rows):
            raise ValueError("class indices and names must be unique")

    @classmethod
    def from_train_folder_names(cls, names, order="numeric"):
        """Class map for the given train subfolder names (see the module docstring for the rules).

        ``order`` (``"numeric"`` or ``"keras"``) only matters when every name is an integer.
        Raises :class:`UserError` for an empty or duplicated list.
        """
        if order not in ORDERS:
            raise ValueError(f"unknown class order {order!r}")
        names = [str(n) for n in names]
        if not names:
            raise UserError("the train folder has no class subfolders")
        if len(set(names)) != len(names):
            raise UserError(f"duplicate class folder names: {sorted(names)}")
        if all(is_imagenet_wnid(n) for n in names):
            table = imagenet_classes()
            idx = _imagenet_index()
            return cls("imagenet", [(idx[n], n, table[idx[n]][1]) for n in names])
        if all(_INDEX.match(n) for n in names) and order == "numeric":
            values = [int(n) for n in names]
            if len(set(values)) != len(values):
                raise UserError(f"class folders name the same index twice: {sorted(names)}")
            return cls("folders", [(v, n, n) for v, n in zip(values, names)])
        return cls("folders", [(i, n, n) for i, n in enumerate(sorted(names))])

    def index_of(self, name):
        """Index of a class name; raises ``KeyError`` for an unknown name."""
        return self._by_name[str(name)]

    def name_of(self, index):
        """Class name (folder name / wnid) of an index.

        For kind ``imagenet`` any of the 1000 indices works; otherwise raises ``KeyError`` for an
        index absent from the train folder.
        """
        index = int(index)
        if index in self._by_index:
            return self._by_index[index][0]
        if self.kind == "imagenet" and 0 <= index < len(imagenet_classes()):
            return imagenet_classes()[index][0]
        raise KeyError(index)

    def human(self, index):
        """Readable class name: the ImageNet name for any of the 1000 indices (kind imagenet),
        else the folder name, or ``str(index)`` for an unknown index."""
        index = int(index)
        if self.kind == "imagenet" and 0 <= index < len(imagenet_classes()):
            return imagenet_classes()[index][1]
        if index in self._by_index:
            return self._by_index[index][1]
        return str(index)

    def indices(self):
        """Sorted list of the indices present in the train folder."""
        return sorted(self._by_index)

    def names(self):
        """Class names in index order."""
        return [self._by_index[i][0] for i in self.indices()]

    def __len__(self):
        return len(self._by_index)

    def __contains__(self, name):
        return str(name) in self._by_name

    def __eq__(self, other):
        return (isinstance(other, ClassMap) and self.kind == other.kind
                and self._by_index == other._by_index)

    def __repr__(self):
        return f"ClassMap(kind={self.kind!r}, {len(self)} classes)"

    def digest(self):
        """16 hex digits that change whenever a label number comes to mean another class.

        Kind ``folders``: a SHA-256 of the ordered ``index, name`` list. Kind ``imagenet``: labels
        are the canonical ImageNet indices whatever classes the train folder holds, so the digest
        is that of the whole 1000-class table (adding an ImageNet class changes no label's meaning).
        Archives record it as ``meta_classes``; see :func:`influence.data.archive_reader.check_same_classes`.
        """
        if self.kind == "imagenet":
            rows = [(i, w) for i, (w, _) in enumerate(imagenet_classes())]
        else:
            rows = [(i, n) for i, (n, _) in sorted(self._by_index.items())]
        text = self.kind + "\n" + "".join(f"{i}\t{n}\n" for i, n in rows)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def to_dict(self):
        """The ``labels.json`` content as a dict."""
        return {
            "kind": self.kind,
            "digest": self.digest(),
            "classes": [{"index": i, "name": n, "human": h}
                        for i, (n, h) in sorted(self._by_index.items())],
        }

    def save(self, path):
        """Write ``labels.json`` atomically (temporary name in the same folder, then rename)."""
        path = os.fspath(path)
        tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                           f".{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.partial")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.to_dict(), fh, indent=1, ensure_ascii=False)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Read a ``labels.json``; raises :class:`UserError` if missing or malformed."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such labels file; run prepare_data.py first")
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            return cls(data["kind"], [(c["index"], c["name"], c.get("human", c["name"]))
                                      for c in data["classes"]])
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: not a valid labels.json ({exc})") from None


def order_conflicts(names):
    """Classes whose index differs between ``class_order`` ``numeric`` and ``keras``.

    ``names``: train subfolder names. Returns a list of ``(name, numeric index, keras index)``
    sorted by numeric index; empty unless every name is an integer and some integer differs
    from its position in text order (``10`` before ``2``, or names not starting at ``0``).
    """
    names = [str(n) for n in names]
    if not names or not all(_INDEX.match(n) for n in names):
        return []
    keras = {n: i for i, n in enumerate(sorted(names))}
    return sorted(((n, int(n), keras[n]) for n in names if int(n) != keras[n]),
                  key=lambda row: row[1])


def test_subfolder_index(classmap, subfolder_name):
    """Class index of a test subfolder.

    A train class name gives that class's index; an ImageNet wnid gives its canonical index when
    the class map is of kind ``imagenet`` (even a class absent from the train folder) or when there
    is no class map; otherwise an integer name (``0``...``999``) gives that index. ``classmap`` may
    be ``None`` (no ``labels.json``). Anything else raises :class:`UserError` naming the folder and
    what is accepted.
    """
    name = os.path.basename(os.path.normpath(str(subfolder_name)))
    if classmap is not None and name in classmap:
        return classmap.index_of(name)
    if (classmap is None or classmap.kind == "imagenet") and is_imagenet_wnid(name):
        return _imagenet_index()[name]
    if _INDEX.match(name):
        index = int(name)
        if classmap is not None and classmap.kind == "imagenet" and index >= len(imagenet_classes()):
            raise UserError(f"test subfolder {subfolder_name!r}: index {index} is not an "
                            f"ImageNet class index (0-{len(imagenet_classes()) - 1})")
        return index
    if classmap is None:
        raise UserError(f"test subfolder {subfolder_name!r} is not a class index; without a "
                        "labels.json test subfolders must be named 0, 1, 2, ... (or by ImageNet wnid)")
    shown = classmap.names()
    listed = ", ".join(shown[:10]) + (", ..." if len(shown) > 10 else "")
    raise UserError(f"test subfolder {subfolder_name!r} is neither a class index (0, 1, ...) "
                    f"nor a train class name ({listed})")


test_subfolder_index.__test__ = False  # a library function, not a pytest test
