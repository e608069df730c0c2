"""The settings of a calculate run: one dataclass, saved in run.json, and which of them change the numbers.

Each field carries its concern (:data:`GROUPS`: data and outputs, model, inverse-HVP, self-influence,
resources, scale-out), its help text and its own check, in one place (kronfluence's ``arguments.py``
is the model): calculate.py's parser takes help and argument groups from here, and
:meth:`Settings.check` refuses a wrong value with a :class:`influence.errors.SettingError` naming
the field (the CLI shows its flag). Field names match calculate.py's long options;
:mod:`influence.engine` runs a job from a :class:`Settings`; :mod:`influence.distributed` sends them
to its workers.
"""
import dataclasses

from influence.errors import SettingError

#: settings that change the numbers: a resumed run must agree on them
MATH_SETTINGS = ("model", "weights", "preprocess", "params", "solver", "hessian", "damping", "scale", "iter", "bsize",
                 "repeats", "seed", "cg_tol", "cg_maxiter", "fisher", "ekfac_max_block", "rank")


#: the concerns the settings are grouped by, in the order calculate.py's --help shows them
GROUPS = ("data and outputs", "model", "inverse Hessian-vector product",
          "self-influence: which training images look mislabelled?", "resources",
          "scale-out (needs Ray: pip install -r requirements-distributed.txt)")


def _setting(default, group, help, check=None):
    """A field with its concern (one of :data:`GROUPS`), its help text and, optionally, its own check:
    ``check(value) -> None`` or a message (the value is wrong), raised by :meth:`Settings.check`."""
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "check": check})


def _at_least(low, note=""):
    return lambda v: None if v >= low else f"must be >= {low}{note}, got {v}"


def _rank(value):
    """``rank``'s check: ``auto`` or a positive integer (:func:`influence.curvature.krylov.parse_rank`)."""
    from influence.curvature.krylov import parse_rank

    try:
        parse_rank(value)
    except SettingError as exc:
        return exc.message
    return None


_DATA, _MODEL, _IHVP, _SELF, _RES, _RAY = GROUPS


@dataclasses.dataclass
class Settings:
    """Every setting of a run (saved in run.json), each with its concern, help text and check (the
    fields' metadata: :func:`help_of`, :meth:`check`). Field names match calculate.py's options."""

    data: str = _setting(".", _DATA, "folder with train.npz, test.npz and labels.json from prepare_data.py")
    out: str = _setting("calc_output", _DATA, "output folder")
    model: str = _setting("vgg16", _MODEL, "keras.applications name (vgg16, resnet50, ...) or a .keras/.h5 file")
    weights: str = _setting("imagenet", _MODEL, "weights of a keras.applications model: imagenet (downloaded once "
                                                "by Keras), a local weights file for offline machines, or none (random)")
    preprocess: str = _setting("auto", _MODEL, "input transform: auto = the application's own, none for a model file")
    params: str = _setting("all", _MODEL, "parameters the influence is taken over: all, the last N layers with "
                                          "weights, or comma-separated layer names")
    solver: str = _setting("auto", _IHVP, "the inverse-HVP method; auto = lissa when iter, bsize, scale or repeats "
                                          "is given (the original tool's), else krylov when memory_budget holds "
                                          "its basis of 64 eigenpairs, else ekfac (influence.curvature.choice)")
    # the LDS panel: cg 0.079 (full, the least damping that runs) -> 0.366 (ggn) on the demo CNN
    hessian: str = _setting("ggn", _IHVP, "the matrix of exact/cg/lissa/pcg: ggn = the Gauss-Newton matrix "
                                          "(positive semi-definite: works away from a minimum), full = the Hessian "
                                          "of the training loss (as Koh & Liang); kfac/ekfac approximate the "
                                          "Fisher either way")
    iter: int = _setting(1000, _IHVP, "LiSSA recursion depth", _at_least(1))
    bsize: int = _setting(10, _IHVP, "LiSSA minibatch, drawn uniformly from the whole training archive", _at_least(1))
    repeats: int = _setting(1, _IHVP, "LiSSA runs averaged", _at_least(1))
    # 0.1 x the curvature's mean eigenvalue (per layer for kfac/ekfac): the LDS panel's choice
    damping: object = _setting("auto", _IHVP, "solve (H + LAMBDA I) x = v; or relative to the curvature's scale: "
                                              "'auto' = 0.1x, or a factor like 0.3x: x each layer's mean Fisher "
                                              "eigenvalue (kfac/ekfac), x the mean eigenvalue trace(H)/P (exact; "
                                              "cg/lissa/pcg estimate it with 10 products over the training set)")
    scale: str = _setting("auto", _IHVP, "LiSSA scale; auto = 1.1 x lambda_max(H + LAMBDA I) by power iteration, "
                                         "the largest of the whole-sample and minibatch estimates")
    seed: int = _setting(0, _IHVP, "seed of the LiSSA minibatches and power iteration, and of the sampled Fisher's "
                                   "labels")
    cg_tol: float = _setting(1e-6, _IHVP, "cg relative residual", lambda v: None if v > 0 else f"must be > 0, got {v}")
    cg_maxiter: int = _setting(200, _IHVP, "cg iteration cap (50 reaches the final LDS on the demo CNN)", _at_least(1))
    rank: object = _setting("auto", _IHVP, "krylov/dpcg: eigenpairs of the curvature kept; auto = read from the "
                                           "spectrum (those >= 3 x (the smallest eigenvalue found + damping), at "
                                           "most 200, fewer when memory_budget holds fewer)", _rank)
    fisher: str = _setting("auto", _IHVP, "kfac/ekfac/pcg: the Fisher's labels: auto = true up to 10 classes, else "
                                          "top:10; sampled = one sampled from the model's own prediction per image; "
                                          "true = the expectation over all classes (one backward pass per class, at "
                                          "most 100 classes); top:K = the K most probable classes of each image "
                                          "weighted by their probability (K backward passes; for many classes); "
                                          "empirical = the true labels")
    ekfac_max_block: int = _setting(4096, _IHVP, "kfac/ekfac/pcg: split Kronecker factors larger than D x D into "
                                                 "diagonal blocks, bounding memory and eigendecomposition time (VGG16's "
                                                 "fc1 has 25 088 inputs)", _at_least(2))
    cache: str = _setting(None, _IHVP, "curvature cache: training-set work (EK-FAC factors, LiSSA scale, exact "
                                       "Hessian) saved once and reused while the model, params and train.npz are "
                                       "unchanged (default: OUT/curvature)")
    self_influence: bool = _setting(False, _SELF, "also score every training image against itself, grad L_i . "
                                                  "(H + damping I)^-1 grad L_i: writes OUT/self_influence.csv (highest "
                                                  "first) and a figure; cheap with ekfac or exact")
    self_influence_limit: int = _setting(0, _SELF, "only the N highest-loss training images (lets lissa/cg/pcg do it: "
                                                   "one inverse-HVP each); 0 = all",
                                         _at_least(0, " (0 = every training image)"))
    max_exact_params: int = _setting(10_000, _IHVP, "refuse solver exact above this many parameters", _at_least(1))
    top: int = _setting(5, _DATA, "training images per harmful/useful figure and CSV", _at_least(1))
    save_format: str = _setting("pdf", _DATA, "figure format")
    figures: bool = _setting(True, _DATA, "draw each test image's harmful/useful strips and summary figure; "
                                          "--no-figures writes only the CSVs, score dicts and the HTML report "
                                          "(with its thumbnails), for users who want the numbers")
    folders: list = _setting(None, _DATA, "only these test folders (default: all)")
    limit: int = _setting(0, _DATA, "at most N test images per label and folder; 0 = all",
                          _at_least(0, " (0 = all test images)"))
    overwrite: bool = _setting(False, _DATA, "redo test images whose outputs exist (default: skip them, so a rerun "
                                             "resumes)")
    memory_budget: float = _setting(2.0, _RES, "bound for everything a run holds: inverse-HVPs scored together, one "
                                               "scoring or HVP call, curvature factors (GB)",
                                    lambda v: None if v > 0 else f"must be > 0 (GB), got {v}")
    score_batch: int = _setting(256, _RES, "training images per scoring step, at most", _at_least(1))
    workers: int = _setting(0, _RAY, "start a local Ray runtime with N workers (one GPU each when there are GPUs) "
                                     "that fit kfac/ekfac/pcg curvature and score the training archive in shards; "
                                     "with ray_address, at most N tasks at once; 0 = no Ray, one process",
                            _at_least(0, " (0 = no Ray)"))
    ray_address: str = _setting(None, _RAY, "join a running Ray cluster (`ray start --head` prints ADDR, host:6379) "
                                            "instead of starting one; every node must see data and out at the same "
                                            "paths")

    def check(self):
        """Each setting's own check (its field's metadata), and the scale: the first wrong one raises a
        :class:`SettingError` naming it. Checks that need the solver registry live with the solvers."""
        for f in dataclasses.fields(self):
            check = f.metadata.get("check")
            message = check(getattr(self, f.name)) if check else None
            if message:
                raise SettingError(f.name, message)
        self.scale_value()
        return self

    @classmethod
    def from_args(cls, args):
        """The settings of calculate.py's parsed ``args``: those given (:func:`given_settings`), the rest
        at this class's defaults."""
        return cls(**given_settings(args))

    def scale_value(self):
        """None for ``auto``, else the number."""
        if str(self.scale).lower() == "auto":
            return None
        try:
            value = float(self.scale)
        except ValueError:
            raise SettingError("scale", f"must be a number or 'auto', got {self.scale!r}") from None
        if not value > 0:
            raise SettingError("scale", f"must be > 0, got {self.scale}")
        return value


def given_settings(args):
    """``{name: value}`` of the settings given on calculate.py's command line: its parser's defaults are
    None (the defaults live in :class:`Settings` only), so a value that is not None was given."""
    names = {f.name for f in dataclasses.fields(Settings)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def help_of(name):
    """The help text of setting ``name`` (the CLI adds its default)."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(Settings)}[name]


def group_of(name):
    """The concern of setting ``name``: one of :data:`GROUPS`."""
    return {f.name: f.metadata["group"] for f in dataclasses.fields(Settings)}[name]
