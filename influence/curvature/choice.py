"""``--solver auto``: the inverse-HVP method of a run, from the settings given and the model's size.

The rule (:func:`choose_solver`), in order:

1. ``lissa`` when any of the original tool's LiSSA settings is given explicitly: ``iter`` (``-i``),
   ``bsize`` (``-b``), ``scale`` or ``repeats`` (calculate.py's flags, or the Python API's options), so
   ``calculate.py -i 20 -b 10 -sf pdf`` keeps its original meaning;
2. ``ekfac`` for a model that normalises by batch statistics (a BatchNormalization layer; :data:`AUTO_BATCH_NORM`):
   on every BatchNorm model of the LDS panel EK-FAC was truer than krylov with any damping (README, "What
   the panel decided");
3. ``krylov`` when the memory budget holds its fit with at least :data:`AUTO_MIN_RANK` eigenpairs over
   the selected parameters (:func:`influence.curvature.lowrank.krylov.affordable_rank`: the Lanczos basis may
   take half of ``memory_budget``) and those pairs are not too few for the parameters (at most
   :data:`AUTO_PARAMS_PER_PAIR` parameters per pair, :func:`thin_basis`);
4. ``store`` otherwise (:data:`AUTO_LARGE`: the gradient store, each layer's gradient projected on its steepest
   K-FAC directions and written once; nothing in it grows with parameters × rank, and a test image costs no pass
   over the training set), or ``ekfac`` for a model whose layers cannot be tapped (a subclassed model).

It is resolved once the model is loaded (the parameter count is known) and before the solver is built;
everything after sees the method chosen, never ``auto``.
"""
from influence.curvature.base import REGISTRY
from influence.curvature.lowrank.krylov import (AUTO_MAX_RANK, AUTO_MIN_RANK, BASIS_SHARE, STEPS_PER_PAIR,
                                                affordable_rank)
from influence.errors import SettingError
from influence.settings import LISSA_SETTINGS, bytes_to_gb, parse_damping  # LiSSA: the original tool's settings (lissa flag)

AUTO = "auto"
#: the methods ``auto`` may choose
CANDIDATES = ("lissa", "krylov", "ekfac")


def solver_choices():
    """``--solver``'s values: ``auto`` and the registered methods."""
    return [AUTO, *REGISTRY]


#: ``--solver auto`` takes ekfac for a model with BatchNormalization layers (module docstring, rule 2)
AUTO_BATCH_NORM = True
#: above this many parameters per eigenpair krylov's basis is too thin (module docstring, rule 3): the floor, the
#: first eigenvalue left out, then damps nearly all of the spectrum. Set between the two panel models that bound it
#: (their geometric mean): ``wide-fixed``, 135 pairs for 659 267 parameters (4 883 per pair, floor 26 × the median
#: optimizer damping), where EK-FAC won (0.207 against krylov's 0.130), and ``mlp-large-fixed``, 200 pairs for
#: 324 010 (1 620 per pair), where krylov won (0.440 against EK-FAC's best 0.429); the demo CNN and the small MLPs
#: have 36–194
AUTO_PARAMS_PER_PAIR = 2800


#: what ``auto`` takes where krylov does not fit or its basis is too thin (module docstring, rule 4), for a model whose
#: layers can be tapped (else ekfac)
AUTO_LARGE = "store"
#: the measurement behind :data:`AUTO_LARGE` (README, "The gradient store on the panel")
LARGE_EVIDENCE = ("on the LDS panel's two 659 k-parameter models the gradient store was truer than EK-FAC on one "
                  "(0.256 against 0.152) and 0.022 below it on the other")


def batch_norm_layers(model):
    """Names of the BatchNormalization layers of a Keras model, nested models included (a list)."""
    names = []
    for layer in getattr(model, "layers", None) or []:
        if "BatchNormalization" in type(layer).__name__:
            names.append(layer.name)
        elif getattr(layer, "layers", None):
            names.extend(batch_norm_layers(layer))
    return names


def choose_solver(requested, given, num_params, itemsize, memory_budget, batch_norm=(), tappable=True):
    """The method of a run and why -> ``(name, reason)``, ``reason`` one sentence.

    Args:
      requested: the ``solver`` setting: ``auto`` or a registered method (returned as is).
      given: names of the settings given explicitly (calculate.py's flags, or the API's options).
      num_params: parameters the influence is taken over (the model's selected ones).
      itemsize: bytes of one of them (4 for float32).
      memory_budget: GB (None: no budget).
      batch_norm: names of the model's BatchNormalization layers (:func:`batch_norm_layers`).
      tappable: whether the model's layers can be tapped (a functional or Sequential Keras model): the store needs
        it, so a model where krylov does not fit or is too thin takes ekfac without it.
    """
    if requested != AUTO:
        if requested not in REGISTRY:
            raise SettingError("solver", f"must be one of {', '.join(solver_choices())}, got {requested!r}")
        return requested, f"{requested}, as asked"
    lissa = [name for name in LISSA_SETTINGS if name in set(given)]
    if lissa:
        return "lissa", f"auto: lissa ({', '.join(lissa)} given: the original tool's LiSSA)"
    if batch_norm and AUTO_BATCH_NORM:
        shown = ", ".join(batch_norm[:3]) + (", ..." if len(batch_norm) > 3 else "")
        return "ekfac", (f"auto: ekfac (the model normalises by batch statistics ({shown}): on the LDS panel's "
                         f"BatchNorm models EK-FAC was truer than krylov; --calibrate measures both on yours)")
    pairs = krylov_pairs(num_params, itemsize, memory_budget)
    example = "" if "params" in set(given) else " (e.g. last:1)"       # params given: the user chose them already
    large = AUTO_LARGE if tappable else "ekfac"
    instead = "" if tappable else "; the store needs a functional Keras model, this one cannot be tapped"
    if pairs < AUTO_MIN_RANK:
        need = bytes_to_gb((STEPS_PER_PAIR + 1) * AUTO_MIN_RANK * num_params * itemsize)
        return large, (f"auto: {large} (a krylov basis of {AUTO_MIN_RANK} pairs over {num_params:,} parameters needs "
                       f"{need:.3g} GB, above {BASIS_SHARE:.0%} of memory_budget {memory_budget:g} GB; choose fewer "
                       f"parameters with params{example} for krylov{instead})")
    if thin_basis(num_params, pairs):
        return large, (f"auto: {large} (krylov's basis would hold {pairs} pairs for {num_params:,} parameters, "
                       f"{num_params / pairs:,.0f} per pair, above {AUTO_PARAMS_PER_PAIR}: its floor would damp "
                       f"nearly all of the spectrum; {LARGE_EVIDENCE}{instead})")
    if memory_budget is None:
        return "krylov", (f"auto: krylov (no memory budget; its basis of up to {pairs} pairs over {num_params:,} "
                          f"parameters)")
    return "krylov", (f"auto: krylov (its basis of up to {pairs} pairs over {num_params:,} parameters fits the "
                      f"{memory_budget:g} GB memory budget)")


def per_layer_structure(clf, memory_budget):
    """``store_curvature auto``: ``(structure, reason)``, ``blocks`` (each layer's block of the projected matrix
    alone) where ``solver auto`` does not take krylov for the model (BatchNormalization layers, or krylov's basis
    too thin or too large: :func:`choose_solver`), else ``dense`` (the whole matrix, across layers).

    Measured on the LDS panel (README, "The gradient store"): the blocks were truer on the five models where EK-FAC
    beats krylov (+0.016 to +0.052 at damping ``optimizer``), the whole matrix on the others where they differ by
    more than 0.005 (the demo CNN +0.071, ``mlp-large-fixed`` +0.015), as the block-diagonal EK-FAC against the
    cross-layer krylov on the same models."""
    name, reason = choose_solver(AUTO, (), clf.num_params, clf.dtype.size, memory_budget, batch_norm_layers(clf.model))
    why = reason[reason.index("(") + 1:-1] if "(" in reason else reason
    if name != "krylov":
        return "blocks", f"store_curvature auto: blocks, each layer alone ({why})"
    return "dense", f"store_curvature auto: dense, across layers (solver auto would take {name}: {why})"


def krylov_pairs(num_params, itemsize, memory_budget):
    """The eigenpairs ``auto``'s krylov would hold: at most :data:`AUTO_MAX_RANK`, the budget's
    (:func:`affordable_rank`; no budget: no limit) and the parameters."""
    cap = affordable_rank(num_params, itemsize, memory_budget)
    return min(AUTO_MAX_RANK, num_params) if cap is None else min(AUTO_MAX_RANK, cap, num_params)


def thin_basis(num_params, pairs):
    """Whether ``pairs`` eigenpairs are too few for ``num_params`` parameters (:data:`AUTO_PARAMS_PER_PAIR`)."""
    return pairs < AUTO_MIN_RANK or num_params / max(int(pairs), 1) > AUTO_PARAMS_PER_PAIR


#: the solvers whose ``damping auto`` is ``optimizer`` when the model holds its training state (README, "Damping
#: from the training run": the LDS panel's measurements; the store's at its ``store_curvature auto``: above 0.1x
#: and 1x on 11 of the 12 panel models, README "The gradient store on the panel"). kfac / ekfac take ``optimizer`` too, per eigen-direction,
#: but only where krylov's basis is too thin for the model (the 659 k-parameter model: 0.207 / 0.152 against 0.158 /
#: 0.134 at 1x); on the MLPs and BatchNorm CNNs it scored below their relative damping
AUTO_OPTIMIZER = ("krylov", "exact", "store")
#: ``damping auto`` of kfac / ekfac on a model with BatchNormalization layers: this factor of each layer's mean
#: eigenvalue instead of 0.1 (on the panel's BatchNorm models EK-FAC's best; README, "What the panel decided")
AUTO_BATCH_NORM_FACTOR = 1.0


def choose_damping(solver, damping, clf, thin=False, loss=None):
    """The damping of a run and why -> ``(Damping, reason or None)``.

    ``damping``: the parsed setting. Given as ``auto`` (:attr:`Damping.auto`):

    * kfac / ekfac on a model with BatchNormalization layers: :data:`AUTO_BATCH_NORM_FACTOR` (``1x``);
    * krylov / exact / store (:data:`AUTO_OPTIMIZER`) on a model whose saved optimizer state can be read
      (:func:`influence.model.training_state.response_diagonal`): ``optimizer:c``, ``c`` from the mean training
      loss (``loss()``, called only then: :func:`influence.model.training_state.response_factor`; without
      ``loss``, 1);
    * kfac / ekfac where krylov's basis is too thin (``thin``, :func:`thin_basis`), with that state: ``optimizer``;
    * else as it is (``0.1x``), the reason saying why when the optimizer state was missing.
    """
    from influence.model.training_state import (RESPONSE_BOUNDS, RESPONSE_LOSS, NoTrainingState, response_diagonal,
                                                response_factor)

    kronecker = getattr(REGISTRY.get(solver), "kronecker", False)
    if damping.auto and kronecker and batch_norm_layers(clf.model):
        factor = AUTO_BATCH_NORM_FACTOR
        return (parse_damping(f"{factor:g}x"),
                f"damping auto: {factor:g}x (each layer's mean eigenvalue; a BatchNorm model: the panel's best for EK-FAC)")
    wants = solver in AUTO_OPTIMIZER or (thin and kronecker)
    if not (damping.auto and wants and getattr(REGISTRY.get(solver), "takes_diagonal", False)):
        return damping, None
    try:
        facts = response_diagonal(clf).facts
    except NoTrainingState as exc:
        return damping, f"damping auto: {damping} ({exc.short})"
    where = f"per parameter, from the {facts['optimizer']} state of {facts['steps']} training steps"
    if solver not in AUTO_OPTIMIZER or loss is None:
        return parse_damping("optimizer"), f"damping auto: optimizer ({where})"
    mean = float(loss())
    c = response_factor(mean)
    return (parse_damping(f"optimizer:{c:g}"),
            f"damping auto: optimizer:{c:g} ({where}; {c:g} = sqrt(mean training loss {mean:.2g} / {RESPONSE_LOSS:g}) "
            f"within {RESPONSE_BOUNDS[0]:g}-{RESPONSE_BOUNDS[1]:g}: a model trained far past fitting its data responds "
            f"less than its steps say, a briefly trained one more)")


def choose_method(requested, given, clf, memory_budget, damping, loss=None):
    """:func:`choose_solver` then :func:`choose_damping` on the loaded classifier ``clf`` -> ``(solver name,
    Damping, reason, whether to log it)``: the reason is one line (the solver's, then the damping's when
    ``auto`` was resolved), logged when either was ``auto``. ``loss``: () -> the mean training loss, for
    ``damping auto``'s factor."""
    name, reason = choose_solver(requested, given, clf.num_params, clf.dtype.size, memory_budget,
                                 batch_norm_layers(clf.model), clf.supports_tap)
    thin = thin_basis(clf.num_params, krylov_pairs(clf.num_params, clf.dtype.size, memory_budget))
    damping, why = choose_damping(name, damping, clf, thin, loss)
    return name, damping, f"{reason}; {why}" if why else reason, requested == AUTO or bool(why)
