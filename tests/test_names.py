"""No private name is read across a module boundary, in influence/ and benchmarks/.

A name that starts with one underscore belongs to its module: another module that needs it gets a public
name (or a public API that exists). Read by ``ast``, per module:

* ``from m import _x``, ``import m._x``: always a cross-module read;
* ``obj._x`` (and ``getattr(obj, "_x")``, ``hasattr``, ``setattr``): allowed on ``self`` and ``cls``, and on
  another object when this module defines ``_x`` itself (a ``def``/``class`` or an assignment): an object of
  its own classes (``other._by_index`` in ``__eq__``); never on a name this module imported (``demo._x``);
* Keras's and TensorFlow's internals (``keras.src``, ``tensorflow.python``, any ``_x`` of their objects) only
  in ``influence/model/keras_private.py``, which exists for them.

Dunder names (``__version__``) are public.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
#: the module that exists to reach private Keras/TensorFlow API (each use behind one small function)
KERAS_PRIVATE = "influence/model/keras_private.py"
#: modules not checked yet, each with its reason; an entry no longer needed fails the test (drop it)
EXCEPTIONS = set()
INTERNALS = ("keras.src", "tensorflow.python")


def private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _defined_and_imported(tree):
    """Names this module defines (functions, classes, assigned names and attributes, arguments) and the
    names its imports bind."""
    defined, imported = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.attr)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names)
    return defined, imported


def private_reads(source, where):
    """``["where:line: what", ...]``: every read of another module's private name in ``source``."""
    tree = ast.parse(source)
    defined, imported = _defined_and_imported(tree)
    hits = []

    def hit(node, what):
        hits.append(f"{where}:{node.lineno}: {what}")

    def attribute(node, owner, attr):
        if not private(attr) or (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
            return
        if isinstance(owner, ast.Name) and owner.id in imported:
            hit(node, f"{owner.id}.{attr} (another module's)")
        elif attr not in defined:
            hit(node, f"{ast.unparse(owner)}.{attr} (defined in no place of this module)")

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            for a in node.names:
                if private(a.name) or any(map(private, module.split("."))) or module.startswith(INTERNALS):
                    hit(node, f"from {module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if any(map(private, a.name.split("."))) or a.name.startswith(INTERNALS):
                    hit(node, f"import {a.name}")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.ctx, ast.Load):
                attribute(node, node.value, node.attr)
            if (isinstance(node.value, ast.Name) and node.value.id in ("keras", "tf", "tensorflow")
                    and node.attr in ("src", "python")):
                hit(node, ast.unparse(node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
            attribute(node, node.args[0], node.args[1].value)
    return sorted(set(hits))


def checked_modules():
    for top in ("influence", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            yield path.relative_to(REPO).as_posix(), path


def test_no_module_reads_another_modules_private_names():
    hits = []
    for rel, path in checked_modules():
        if rel != KERAS_PRIVATE and rel not in EXCEPTIONS:
            hits += private_reads(path.read_text(encoding="utf-8"), rel)
    assert not hits, "private names read across modules (make them public or use a public API):\n" + "\n".join(hits)


def test_every_exception_is_still_needed():
    modules = dict(checked_modules())
    for rel in EXCEPTIONS:
        assert rel in modules, f"{rel} is gone: drop it from EXCEPTIONS"
        assert private_reads(modules[rel].read_text(encoding="utf-8"), rel), f"{rel} reads no private name now: drop it"


@pytest.mark.parametrize("source, found", [
    ("from influence.x import _helper", "from influence.x import _helper"),
    ("import influence._impl", "import influence._impl"),
    ("from keras.src.models import Functional", "from keras.src.models import Functional"),
    ("import keras\nkeras.src.ops.Function", "keras.src"),
    ("from influence.experiments import demo\ndemo._command(1)", "demo._command (another module's)"),
    ("import argparse\ndef f(parser):\n    return parser._actions", "parser._actions (defined in no place"),
    ("def f(opt):\n    return getattr(opt, '_learning_rate')", "opt._learning_rate (defined in no place"),
])
def test_the_scan_finds_each_kind_of_read(source, found):
    hits = private_reads(source, "m.py")
    assert len(hits) == 1 and found in hits[0], hits


@pytest.mark.parametrize("source", [
    "class A:\n    _y = 1\n    def f(self):\n        return self._x + type(self)._y\n    @classmethod\n"
    "    def g(cls):\n        return cls._z",
    "class A:\n    def __init__(self):\n        self._key = 1\n    def __eq__(self, other):\n"
    "        return self._key == other._key",
    "import influence\nv = influence.__version__",
    "def f(x):\n    return getattr(x, '__name__', None)",
])
def test_the_scan_allows_a_modules_own_names(source):
    assert private_reads(source, "m.py") == []
