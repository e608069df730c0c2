"""The settings of a calculate run: one dataclass, saved in run.json, and which of them change the numbers.

Each field carries its concern (:data:`GROUPS`: data and outputs, model, inverse-HVP, self-influence,
resources, scale-out), its help text, its own check and its roles, in one place (kronfluence's
``arguments.py`` is the model): calculate.py's parser takes help, argument groups and type functions
from here, and :meth:`Settings.check` refuses a wrong value with a :class:`influence.errors.SettingError`
naming the field (the CLI shows its flag). Every list of setting names is derived from the fields'
metadata, never kept by hand:

* :data:`MATH_SETTINGS` (``math=True``): the settings that change the numbers (the resume check of
  :mod:`influence.run_record`, the Ray parts' key);
* :data:`SOLVER_OPTIONS` (``solver=True``): the options a solver takes (:meth:`Settings.solver_options`,
  what :meth:`influence.Influence.from_settings` and the Ray workers build a solver with);
* :data:`DEFAULTS`: every setting's default, shared by calculate.py and :class:`influence.Influence`.

A setting with a value type (``damping``: a :class:`Damping`) names its parser (``parse``): calculate.py's
type function, the construction of :class:`Settings` (``__post_init__``) and the solvers all use that one
parser, which returns a parsed value as it is. Field names match calculate.py's long options;
:mod:`influence.engine` runs a job from a :class:`Settings` (its Ray workers get the API's
:meth:`influence.Influence.worker_spec`, not the settings).
"""
import dataclasses

from influence.errors import SettingError, UserError

#: the concerns the settings are grouped by, in the order calculate.py's --help shows them
GROUPS = ("data and outputs", "model", "inverse Hessian-vector product",
          "self-influence: which training images look mislabelled?", "resources",
          "scale-out (needs Ray: pip install -r requirements-distributed.txt)",
          "calibration: how far can the scores be trusted on this model? (retrains it)")

#: ``memory_budget``'s default, GB: the :class:`Settings` field's and every solver constructor's
MEMORY_BUDGET_GB = 2.0
#: bytes in one GB of ``memory_budget`` (GiB: 2**30)
_GB = 2**30


def gb_to_bytes(gb):
    """``gb`` GB of ``memory_budget`` (the unit every budget is given in) in bytes; the one conversion."""
    return gb * _GB


def bytes_to_gb(nbytes):
    """``nbytes`` bytes in the GB of :func:`gb_to_bytes` (for messages and records)."""
    return nbytes / _GB


#: the factor of ``damping auto``: λ_b = AUTO_FACTOR × mean eigenvalue of block b
#: (:mod:`influence.curvature.damping` says how each method takes it)
AUTO_FACTOR = 0.1


@dataclasses.dataclass(frozen=True)
class Damping:
    """The ``damping`` setting parsed: ``value`` is λ when ``relative`` is False, else the factor of the
    curvature's mean eigenvalue (:mod:`influence.curvature.damping`)."""

    value: float
    relative: bool = False
    #: ``optimizer``: per parameter, ``value ×`` the training run's response damping
    #: (:mod:`influence.model.training_state`); a method that takes it solves in the scaled coordinates
    optimizer: bool = False
    #: given as ``auto``: a solver that takes ``optimizer`` resolves it so when the model holds its training
    #: state (:func:`influence.curvature.choice.choose_damping`); compares equal to the factor it stands for
    auto: bool = dataclasses.field(default=False, compare=False)

    def __str__(self):
        if self.optimizer:
            return "optimizer" if self.value == 1 else f"optimizer:{self.value:g}"
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"

    def for_block(self, mean_eigenvalue):
        """λ of one block whose eigenvalues (``Λ + ρ``) have mean ``mean_eigenvalue``."""
        return self.value * float(mean_eigenvalue) if self.relative else self.value

    def recorded(self):
        """As run.json (and calculate.py's flag) spells it: λ a number, a relative damping its text (``0.1x``)."""
        return str(self) if self.relative or self.optimizer else self.value


def parse_damping(spec):
    """``0.01`` / ``"0.01"`` / ``"auto"`` / ``"0.3x"`` / ``"optimizer"`` / ``"optimizer:0.3"`` (or a
    :class:`Damping`, returned as is) -> :class:`Damping`.

    The one parser of ``damping``. Raises UserError (naming the setting ``damping``) for anything else
    or a negative value.
    """
    if isinstance(spec, Damping):
        return spec
    text = str(spec).strip().lower()
    if text.startswith("optimizer"):
        factor = text[len("optimizer"):]
        try:
            value = float(factor[1:]) if factor.startswith(":") else 1.0 if not factor else None
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise UserError(f"damping optimizer takes a factor > 0 as optimizer:0.3, got {spec!r}")
        return Damping(value, optimizer=True)
    relative = text == "auto" or text.endswith("x")
    if text == "auto":
        return Damping(AUTO_FACTOR, True, auto=True)
    try:
        value = AUTO_FACTOR if text == "auto" else float(text[:-1] if relative else text)
    except ValueError:
        raise UserError(f"damping must be a number (0.01), 'auto' ({AUTO_FACTOR:g} x each block's mean eigenvalue) "
                        f"or a factor like 0.3x, got {spec!r}") from None
    if not value >= 0 or (relative and value == 0):
        raise UserError(f"damping must be >= 0 (a factor > 0), got {spec!r}")
    return Damping(value, relative)


def _setting(default, group, help, check=None, *, math=False, solver=False, lissa=False, parse=None, option=None):
    """A field with its concern (one of :data:`GROUPS`), its help text and its roles.

    Args:
      check: ``check(value) -> None`` or a message (the value is wrong), raised by :meth:`Settings.check`
        (and :func:`check_setting`).
      math: the setting changes the numbers (:data:`MATH_SETTINGS`: a resumed run must agree on it).
      solver: the setting is a solver option (:data:`SOLVER_OPTIONS`).
      lissa: one of the original tool's LiSSA settings: given explicitly, ``solver auto`` picks lissa
        (:data:`LISSA_SETTINGS`, :mod:`influence.curvature.choice`).
      parse: the value type's one parser (text or parsed value -> parsed value): the default and any value
        given are parsed when a :class:`Settings` is made; calculate.py's type function is the same parser.
      option: ``option(value)`` -> the value a solver takes (``scale``: ``auto`` -> None); default: as is.
    """
    assert group in GROUPS, group
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "check": check, "math": math,
                                                        "solver": solver, "lissa": lissa, "parse": parse,
                                                        "option": option})


def _at_least(low, note=""):
    return lambda v: None if v >= low else f"must be >= {low}{note}, got {v}"


def auto_or_count(setting):
    """The one parser of a setting that is ``"auto"`` or a positive int (``store_dim``, ``rank``, ``epochs``):
    ``parse(value)`` takes text or a number (an int is returned as is) and raises a SettingError naming
    ``setting`` for anything else."""
    def parse(value):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            count = int(value)
        except (TypeError, ValueError, OverflowError):
            count = 0
        if count < 1 or count != float(value):
            raise SettingError(setting, f"must be a positive integer or auto, got {value!r}")
        return count

    parse.__name__ = parse.__qualname__ = f"parse_{setting}"     # pickled by name, as a module function
    return parse


parse_store_dim = auto_or_count("store_dim")
parse_rank = auto_or_count("rank")
parse_epochs = auto_or_count("epochs")


#: the curvature matrices a Hessian solver can take (:class:`influence.model.objective.TrainingObjective`):
#: ``full`` ∇²R, ``ggn`` the Gauss–Newton part
HESSIANS = ("full", "ggn")


def one_of(choices):
    """The check of a setting that takes one of ``choices``: ``value -> None`` or the message."""
    def problem(value):
        return None if value in choices else f"must be one of {', '.join(choices)}, got {value!r}"
    return problem


#: ``hessian``'s check (the one check of the setting: calculate.py's flag, :meth:`Settings.check` and
#: :class:`influence.Influence` use it)
_hessian = one_of(HESSIANS)


def _scale_option(value):
    """``scale`` as LiSSA takes it: None for ``auto``, else the number (:func:`scale_value`)."""
    return scale_value(value)


def _dampings(text):
    """``calibrate_damping``'s check: comma-separated dampings, each as ``damping`` takes it."""
    if text is None:
        return None
    items = [t for t in str(text).split(",") if t.strip()]
    if not items:
        return "must name at least one damping (e.g. 0.1x,1x,10x)"
    for item in items:
        try:
            parse_damping(item)
        except UserError as exc:
            return f"{item.strip()!r}: {exc}"
    return None


#: ``store_projection``: what the gradient store projects each layer's gradient on (influence.store.projection)
STORE_PROJECTIONS = ("kfac", "random")
#: ``store_projection``'s check
store_projection_problem = one_of(STORE_PROJECTIONS)
#: ``store_curvature``: what the gradient store inverts of its projected curvature (influence.store.damping)
STORE_CURVATURES = ("auto", "blocks", "dense")
#: ``store_curvature``'s check
store_curvature_problem = one_of(STORE_CURVATURES)
#: ``calibrate_init``: where each retraining of ``--calibrate`` starts (influence.calibration.retrain)
CALIBRATE_INITS = ("fresh", "fixed")
#: ``calibrate_init``'s check
calibrate_init_problem = one_of(CALIBRATE_INITS)


def _names(text):
    """``calibrate_solvers``' check: comma-separated names (checked against the registry when calibrating)."""
    if text is None:
        return None
    return None if [t for t in str(text).split(",") if t.strip()] else "must name at least one solver (e.g. ekfac)"


_DATA, _MODEL, _IHVP, _SELF, _RES, _RAY, _CAL = GROUPS


@dataclasses.dataclass
class Settings:
    """Every setting of a run (saved in run.json), each with its concern, help text, check and roles (the
    fields' metadata: :func:`help_of`, :meth:`check`, :data:`MATH_SETTINGS`, :data:`SOLVER_OPTIONS`).
    Field names match calculate.py's options. A field with a parser (``damping``) declares its default as
    text (what ``--help`` shows) and holds the parsed value (``Settings().damping == Damping(0.1, True)``)."""

    data: str = _setting(".", _DATA, "folder with train.npz, test.npz and labels.json from prepare_data.py")
    out: str = _setting("calc_output", _DATA, "output folder")
    model: str = _setting("vgg16", _MODEL, "keras.applications name (vgg16, resnet50, ...) or a .keras/.h5 file",
                          math=True)
    weights: str = _setting("imagenet", _MODEL, "weights of a keras.applications model: imagenet (downloaded once "
                                                "by Keras), a local weights file for offline machines, or none (random)",
                            math=True)
    preprocess: str = _setting("auto", _MODEL, "input transform: auto = the application's own, none for a model file",
                               math=True)
    params: str = _setting("all", _MODEL, "parameters the influence is taken over: all, the last N layers with "
                                          "weights, or comma-separated layer names", math=True)
    solver: str = _setting("auto", _IHVP, "the inverse-HVP method; auto = lissa when iter, bsize, scale or repeats "
                                          "is given (the original tool's), else krylov when memory_budget holds "
                                          "its basis of 64 eigenpairs, else ekfac (influence.curvature.choice)",
                           math=True)
    # the LDS panel: cg 0.079 (full, the least damping that runs) -> 0.366 (ggn) on the demo CNN
    hessian: str = _setting("ggn", _IHVP, "the matrix of exact/cg/lissa/pcg: ggn = the Gauss-Newton matrix "
                                          "(positive semi-definite: works away from a minimum), full = the Hessian "
                                          "of the training loss (as Koh & Liang); kfac/ekfac approximate the "
                                          "Fisher either way", check=_hessian, math=True)
    iter: int = _setting(1000, _IHVP, "LiSSA recursion depth", _at_least(1), math=True, solver=True, lissa=True)
    bsize: int = _setting(10, _IHVP, "LiSSA minibatch, drawn uniformly from the whole training archive",
                          _at_least(1), math=True, solver=True, lissa=True)
    repeats: int = _setting(1, _IHVP, "LiSSA runs averaged", _at_least(1), math=True, solver=True, lissa=True)
    # auto (curvature/choice.py: choose_damping): optimizer:c for krylov/exact/store (c from the mean training loss),
    # optimizer for ekfac where krylov's basis is too thin, on a model holding its optimizer state; 1x for ekfac on a
    # BatchNorm model; else 0.1x (README: the LDS)
    damping: Damping = _setting("auto", _IHVP, "solve (H + LAMBDA I) x = v; or relative to the curvature's scale: "
                                              "'auto' (optimizer:c where measured better, c from the mean training loss; 1x for ekfac on a BatchNorm model; else 0.1x), or a factor like 0.3x: x each layer's mean Fisher "
                                              "eigenvalue (kfac/ekfac; store: of its projected matrix), x the "
                                              "mean eigenvalue trace(H)/P (exact; cg/lissa/pcg estimate it with 10 "
                                              "products over the training set); 'optimizer' (every solver; "
                                              "kfac/ekfac per eigen-direction): per "
                                              "parameter, from how the model was trained (its saved Adam/RMSprop/SGD "
                                              "state: steps, learning rate, second moments), optimizer:F scales it",
                                math=True, parse=parse_damping)
    scale: str = _setting("auto", _IHVP, "LiSSA scale; auto = 1.1 x lambda_max(H + LAMBDA I) by power iteration, "
                                         "the largest of the whole-sample and minibatch estimates",
                          math=True, solver=True, lissa=True, option=_scale_option)
    seed: int = _setting(0, _IHVP, "seed of the LiSSA minibatches and power iteration, and of the sampled Fisher's "
                                   "labels", math=True, solver=True)
    cg_tol: float = _setting(1e-6, _IHVP, "cg relative residual", lambda v: None if v > 0 else f"must be > 0, got {v}",
                             math=True, solver=True)
    cg_maxiter: int = _setting(200, _IHVP, "cg iteration cap (50 reaches the final LDS on the demo CNN)",
                               _at_least(1), math=True, solver=True)
    rank: int | str = _setting("auto", _IHVP, "krylov/dpcg: eigenpairs of the curvature kept; auto = read from the "
                                            "spectrum (those >= 3 x (the smallest eigenvalue found + damping), at "
                                            "most 200, fewer when memory_budget holds fewer)",
                            math=True, solver=True, parse=parse_rank)
    fisher: str = _setting("auto", _IHVP, "kfac/ekfac/pcg: the Fisher's labels: auto = true up to 10 classes, else "
                                          "top:10; sampled = one sampled from the model's own prediction per image; "
                                          "true = the expectation over all classes (one backward pass per class, at "
                                          "most 100 classes); top:K = the K most probable classes of each image "
                                          "weighted by their probability (K backward passes; for many classes); "
                                          "empirical = the true labels", math=True, solver=True)
    ekfac_max_block: int = _setting(4096, _IHVP, "kfac/ekfac/pcg: split Kronecker factors larger than D x D into "
                                                 "diagonal blocks, bounding memory and eigendecomposition time (VGG16's "
                                                 "fc1 has 25 088 inputs)", _at_least(2), math=True, solver=True)
    store_dim: int | str = _setting("auto", _IHVP, "store: dimensions D of each training image's projected gradient "
                                                 "(per layer, both sides; the store on disk is N x D x 2 bytes); auto "
                                                 "= the largest whose dense D x D curvature takes half of memory_budget, "
                                                 "at most 8192 and the parameter count",
                                 math=True, solver=True, parse=parse_store_dim)
    store_projection: str = _setting("kfac", _IHVP, "store: what each layer's gradient is projected on: kfac = the top "
                                                    "eigenvectors of the layer's K-FAC factors (one more pass over "
                                                    "the training set; the flattest directions are left out), random "
                                                    "= seeded orthonormal rows", store_projection_problem,
                                     math=True, solver=True)
    store_curvature: str = _setting("auto", _IHVP, "store: what is inverted of the projected Gauss-Newton matrix: "
                                                   "blocks = each layer's own block (the cross-layer blocks left out), "
                                                   "dense = the whole matrix; auto = blocks where solver auto would "
                                                   "not take krylov (BatchNorm layers, or krylov's basis too thin or "
                                                   "too large), else dense; applied after the cache, as the damping "
                                                   "is",
                                    store_curvature_problem, math=True, solver=True)
    cache: str = _setting(None, _IHVP, "curvature cache: training-set work (EK-FAC factors, LiSSA scale, exact "
                                       "Hessian) saved once and reused while the model, params and train.npz are "
                                       "unchanged (default: OUT/curvature)")
    self_influence: bool = _setting(False, _SELF, "also score every training image against itself, grad L_i . "
                                                  "(H + damping I)^-1 grad L_i: writes OUT/self_influence.csv (highest "
                                                  "first) and a figure; cheap with ekfac or exact")
    self_influence_limit: int = _setting(0, _SELF, "only the N highest-loss training images (lets lissa/cg/pcg do it: "
                                                   "one inverse-HVP each); 0 = all",
                                         _at_least(0, " (0 = every training image)"))
    max_exact_params: int = _setting(10_000, _IHVP, "refuse solver exact above this many parameters",
                                     _at_least(1), solver=True)
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
    memory_budget: float = _setting(MEMORY_BUDGET_GB, _RES, "bound for everything a run holds: inverse-HVPs scored "
                                                            "together, one scoring or HVP call, curvature factors (GB)",
                                    lambda v: None if v > 0 else f"must be > 0 (GB), got {v}", solver=True)
    score_batch: int = _setting(256, _RES, "training images per scoring step, at most", _at_least(1))
    workers: int = _setting(0, _RAY, "start a local Ray runtime with N workers (one GPU each when there are GPUs) "
                                     "that fit kfac/ekfac/pcg curvature and score the training archive in shards; "
                                     "with ray_address, at most N tasks at once; 0 = no Ray, one process",
                            _at_least(0, " (0 = no Ray)"))
    ray_address: str = _setting(None, _RAY, "join a running Ray cluster (`ray start --head` prints ADDR, host:6379) "
                                            "instead of starting one; every node must see data and out at the same "
                                            "paths")

    calibrate: bool = _setting(False, _CAL, "before scoring, retrain the model from scratch on random half-subsets "
                                            "of the training set (its own compiled optimizer and loss), measure the "
                                            "LDS of a small (solver, damping) grid against those retrainings and the "
                                            "noise ceiling, write OUT/calibration.csv/.json and run.json's "
                                            "calibration entry, and use the best (solver, damping) unless solver or "
                                            "damping is given (then the best that agrees with them); retrainings "
                                            "are cached under the curvature cache")
    calibrate_subsets: int = _setting(16, _CAL, "calibrate: random half-subsets retrained (M)", _at_least(2))
    calibrate_seeds: int = _setting(2, _CAL, "calibrate: training seeds per subset; 2 measure the noise ceiling "
                                             "(seed-to-seed Spearman), 1 halves the retraining and leaves it "
                                             "unmeasured", _at_least(1))
    calibrate_init: str = _setting("fresh", _CAL, "calibrate: where each retraining starts: fresh = the model's own "
                                                   "initialisers under each seed (from scratch); fixed = one "
                                                   "initialisation for every run, the seed ordering the data only, as "
                                                   "fine-tuning runs of one pretrained model share their start (less "
                                                   "seed noise: on the LDS panel's briefly trained models the noise "
                                                   "ceiling doubles)", calibrate_init_problem)
    calibrate_solvers: str = _setting(None, _CAL, "calibrate: comma-separated solvers scored besides the run's "
                                                   "(default: ekfac)", _names)
    calibrate_damping: str = _setting(None, _CAL, "calibrate: comma-separated dampings of every solver of the grid, "
                                                   "besides the run's own (default: 0.1x,1x,10x)", _dampings)
    epochs: int | str = _setting("auto", _CAL, "calibrate: epochs of each retraining; auto = as long as the saved "
                                             "training: the optimizer steps saved in the model file x batch_size / "
                                             "training images (refused when the file holds no steps)",
                                 parse=parse_epochs)
    batch_size: int = _setting(32, _CAL, "calibrate: batch size of each retraining (Keras' fit default)",
                               _at_least(1))

    def __post_init__(self):
        # a setting with a value type is parsed here, once: its parser returns a parsed value as it is
        for f in dataclasses.fields(self):
            parse = f.metadata.get("parse")
            if parse is not None:
                setattr(self, f.name, parse(getattr(self, f.name)))

    def check(self):
        """Each setting's own check (its field's metadata), and the scale: the first wrong one raises a
        :class:`SettingError` naming it. Checks that need the solver registry live with the solvers."""
        for f in dataclasses.fields(self):
            check_setting(f.name, getattr(self, f.name))
        self.scale_value()
        return self

    @classmethod
    def from_args(cls, args):
        """The settings of calculate.py's parsed ``args``: those given (:func:`given_settings`), the rest
        at this class's defaults."""
        return cls(**given_settings(args))

    def values(self):
        """``{name: value}`` of every setting, values as they are (a :class:`Damping` stays one). Unlike
        ``dataclasses.asdict``, a parsed value is not taken apart."""
        return {name: getattr(self, name) for name in NAMES}

    def recorded(self):
        """``{name: value}`` as run.json records them: JSON values (``damping`` as calculate.py spells it:
        a number, or a relative damping's text ``0.1x``)."""
        return {name: value.recorded() if isinstance(value, Damping) else value
                for name, value in self.values().items()}

    def solver_options(self):
        """``{option: value}`` of every solver option (:data:`SOLVER_OPTIONS`) as a solver takes it (each
        method takes those it knows: :func:`influence.curvature.make_solver`)."""
        out = {}
        for f in _fields(solver=True):
            convert = f.metadata.get("option")
            value = getattr(self, f.name)
            out[f.name] = convert(value) if convert else value
        return out

    def scale_value(self):
        """None for ``auto``, else the number."""
        return scale_value(self.scale)


def scale_value(scale):
    """``scale``: None for ``auto``, else the number (SettingError naming ``scale`` when neither)."""
    if str(scale).lower() == "auto":
        return None
    try:
        value = float(scale)
    except ValueError:
        raise SettingError("scale", f"must be a number or 'auto', got {scale!r}") from None
    if not value > 0:
        raise SettingError("scale", f"must be > 0, got {scale}")
    return value


def _fields(of=None, **metadata):
    """The fields of :class:`Settings` (or the dataclass ``of``) whose metadata has every value of
    ``metadata`` (all without)."""
    return [f for f in dataclasses.fields(of or Settings) if all(f.metadata.get(k) == v for k, v in metadata.items())]


def names(of=None, **metadata):
    """The names of the settings whose fields' metadata has every value of ``metadata``, in field order:
    ``names(math=True)``, ``names(group="model")``; every setting without. ``of``: another dataclass of
    such fields (default :class:`Settings`)."""
    return tuple(f.name for f in _fields(of, **metadata))


#: every setting's name, in the order of the fields
NAMES = names()
#: settings that change the numbers (``math=True``): a resumed run must agree on them
MATH_SETTINGS = names(math=True)
#: the settings that are solver options (``solver=True``): each solver takes those it knows
SOLVER_OPTIONS = names(solver=True)
#: the original tool's LiSSA settings (``lissa=True``): any of them given picks lissa for ``solver auto``
LISSA_SETTINGS = names(lissa=True)
#: the settings :class:`influence.Influence` takes (the model's, the inverse-HVP method's and the resources';
#: ``model`` is its first argument; the rest are calculate.py's: data and outputs, self-influence, Ray, calibration)
API_SETTINGS = tuple(n for g in (_MODEL, _IHVP, _RES) for n in names(group=g) if n != "model")
#: every setting's default, as declared (text where the setting has a parser: ``damping`` ``auto``): the
#: defaults of calculate.py and of :class:`influence.Influence`
DEFAULTS = {f.name: f.default for f in _fields()}


def _field(name):
    return Settings.__dataclass_fields__[name]


def parse_setting(name, value):
    """``value`` of setting ``name`` through its field's parser (as is when it has none)."""
    parse = _field(name).metadata.get("parse")
    return parse(value) if parse is not None else value


def check_setting(name, value):
    """The field's own check of setting ``name``: SettingError naming it when ``value`` is wrong; returns
    ``value``. The one check of a setting, whichever face (calculate.py, the API) gives it."""
    check = _field(name).metadata.get("check")
    message = check(value) if check else None
    if message:
        raise SettingError(name, message)
    return value


def same_setting(name, recorded, value):
    """Whether a value of setting ``name`` that run.json recorded (``recorded``) is ``value``: parsed when
    the setting has a parser (``damping``: ``auto`` and ``0.1x`` are the same), else compared as text
    (the way every run.json so far compares)."""
    if _field(name).metadata.get("parse") is not None:
        try:
            return parse_setting(name, recorded) == parse_setting(name, value)
        except UserError:
            return False
    return str(recorded) == str(value)


def given_settings(args):
    """``{name: value}`` of the settings given on calculate.py's command line: its parser's defaults are
    None (the defaults live in :class:`Settings` only), so a value that is not None was given."""
    return {k: v for k, v in vars(args).items() if k in NAMES and v is not None}


def help_of(name):
    """The help text of setting ``name`` (the CLI adds its default)."""
    return _field(name).metadata["help"]


def group_of(name):
    """The concern of setting ``name``: one of :data:`GROUPS`."""
    return _field(name).metadata["group"]
