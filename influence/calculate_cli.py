"""Command line of ``calculate.py`` (the original's -i/-b/-sf kept, long options added)."""
from influence.cli import Parser, import_tensorflow_quietly
from influence.settings import Settings
from influence.outputs.report import FIGURE_FORMATS

D = Settings()


def damping_arg(text):
    """``--damping``: a float (absolute λ) or the normalised text of a relative damping (``0.1x``)."""
    import argparse

    from influence.curvature.damping import parse_damping
    from influence.errors import UserError

    try:
        spec = parse_damping(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return str(spec) if spec.relative else spec.value


def fisher_arg(text):
    """``--fisher``: sampled, true, empirical or top:K (checked here, so a typo fails before the model loads)."""
    import argparse

    from influence.curvature.kfac_signals import FISHER_KINDS, top_classes
    from influence.errors import UserError

    try:
        if text in FISHER_KINDS or top_classes(text) is not None:
            return text
    except UserError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None
    raise argparse.ArgumentTypeError(f"choose sampled, true, empirical or top:K, got {text!r}")


def build_parser():
    import_tensorflow_quietly()  # the --solver registry imports the methods, and they import TensorFlow
    from influence.curvature import method_help, method_names
    from influence.curvature.damping import AUTO_FACTOR
    from influence.model.hvp import HESSIANS

    p = Parser(prog="calculate.py",
               description="For every test image, score every training image by its influence "
                           "(score = grad L_test . (H + damping I)^-1 grad L_train; positive = useful, "
                           "negative = harmful) and write the top images, CSVs and score dicts.")
    io = p.add_argument_group("data and outputs")
    io.add_argument("--data", default=D.data, metavar="DIR",
                    help="folder with train.npz, test.npz and labels.json from prepare_data.py (default: .)")
    io.add_argument("--out", default=D.out, metavar="DIR", help=f"output folder (default: {D.out})")
    io.add_argument("--folders", nargs="+", metavar="NAME", help="only these test folders (default: all)")
    io.add_argument("--limit", type=int, default=D.limit, metavar="N",
                    help="at most N test images per label and folder (default: all)")
    io.add_argument("-sf", "--save-format", default=D.save_format, choices=FIGURE_FORMATS,
                    help=f"figure format (default: {D.save_format})")
    io.add_argument("--top", type=int, default=D.top, metavar="K",
                    help=f"training images per harmful/useful figure and CSV (default: {D.top})")
    io.add_argument("--overwrite", action="store_true",
                    help="redo test images whose outputs exist (default: skip them, so a rerun resumes)")

    m = p.add_argument_group("model")
    m.add_argument("--model", default=D.model,
                   help="keras.applications name (vgg16, resnet50, ...) or a .keras/.h5 file (default: vgg16)")
    m.add_argument("--weights", default=D.weights, metavar="imagenet|none|PATH",
                   help="weights of a keras.applications model: imagenet (downloaded once by Keras), "
                        "a local weights file for offline machines, or none (random) (default: imagenet)")
    m.add_argument("--preprocess", default=D.preprocess, choices=("auto", "none", "caffe", "tf", "torch", "unit"),
                   help="input transform: auto = the application's own, none for a model file (default: auto)")
    m.add_argument("--params", default=D.params, metavar="all|last:N|NAMES",
                   help="parameters the influence is taken over: all, the last N layers with weights, "
                        "or comma-separated layer names (default: all)")

    s = p.add_argument_group("inverse Hessian-vector product")
    s.add_argument("--solver", default=D.solver, choices=method_names(),
                   help=f"{method_help()} (default: {D.solver})")
    s.add_argument("--hessian", default=D.hessian, choices=HESSIANS,
                   help="the matrix of exact/cg/lissa/pcg: full = the Hessian of the training loss, ggn = its "
                        "Gauss-Newton part (positive semi-definite: works away from a minimum); kfac/ekfac "
                        f"approximate the Fisher either way (default: {D.hessian})")
    s.add_argument("--damping", type=damping_arg, default=D.damping, metavar="LAMBDA|auto|Fx",
                   help=f"solve (H + LAMBDA I) x = v; or relative to the curvature's scale: 'auto' = "
                        f"{AUTO_FACTOR:g}x, or a factor like 0.3x: x each layer's mean Fisher eigenvalue "
                        f"(kfac/ekfac), x the mean eigenvalue trace(H)/P (exact; cg/lissa/pcg estimate it "
                        f"with 10 products over the training set) (default: {D.damping})")
    s.add_argument("-i", "--iter", type=int, default=D.iter, metavar="T", help=f"LiSSA recursion depth (default: {D.iter})")
    s.add_argument("-b", "--bsize", type=int, default=D.bsize, metavar="B",
                   help=f"LiSSA minibatch, drawn uniformly from the whole training archive (default: {D.bsize})")
    s.add_argument("--repeats", type=int, default=D.repeats, metavar="R", help="LiSSA runs averaged (default: 1)")
    s.add_argument("--scale", default=D.scale, metavar="auto|S",
                   help="LiSSA scale; auto = 1.1 x lambda_max(H + LAMBDA I) by power iteration, the largest of "
                        "the whole-sample and minibatch estimates (default: auto)")
    s.add_argument("--cg-tol", type=float, default=D.cg_tol, metavar="TOL", help=f"cg relative residual (default: {D.cg_tol:g})")
    s.add_argument("--cg-maxiter", type=int, default=D.cg_maxiter, metavar="N", help=f"cg iteration cap (default: {D.cg_maxiter})")
    s.add_argument("--max-exact-params", type=int, default=D.max_exact_params, metavar="P",
                   help=f"refuse --solver exact above this many parameters (default: {D.max_exact_params})")
    s.add_argument("--fisher", default=D.fisher, type=fisher_arg, metavar="{sampled,true,top:K,empirical}",
                   help="kfac/ekfac/pcg: the Fisher's labels: one sampled from the model's own prediction per "
                        "image, true = the expectation over all classes (one backward pass per class, at most "
                        "100 classes; better on confident models), top:K = the K most probable classes of each "
                        "image weighted by their probability (K backward passes; for many classes), or "
                        f"empirical = the true labels (default: {D.fisher})")
    s.add_argument("--ekfac-max-block", type=int, default=D.ekfac_max_block, metavar="D",
                   help="kfac/ekfac/pcg: split Kronecker factors larger than D x D into diagonal blocks, bounding "
                        f"memory and eigendecomposition time (VGG16's fc1 has 25 088 inputs) (default: {D.ekfac_max_block})")
    s.add_argument("--cache", default=D.cache, metavar="DIR",
                   help="curvature cache: training-set work (EK-FAC factors, LiSSA scale, exact Hessian) saved once "
                        "and reused while the model, --params and train.npz are unchanged (default: OUT/curvature)")
    s.add_argument("--seed", type=int, default=D.seed, metavar="N",
                   help="seed of the LiSSA minibatches and power iteration (default: 0)")

    si = p.add_argument_group("self-influence: which training images look mislabelled?")
    si.add_argument("--self-influence", action="store_true",
                    help="also score every training image against itself, grad L_i . (H + damping I)^-1 grad L_i: "
                         "writes OUT/self_influence.csv (highest first) and a figure; cheap with ekfac or exact")
    si.add_argument("--self-influence-limit", type=int, default=D.self_influence_limit, metavar="N",
                    help="only the N highest-loss training images (lets lissa/cg/pcg do it: one inverse-HVP each) "
                         "(default: all)")

    r = p.add_argument_group("resources")
    r.add_argument("--memory-budget", type=float, default=D.memory_budget, metavar="GB",
                   help="bound for everything a run holds: inverse-HVPs scored together, one scoring or HVP call, "
                        f"curvature factors (default: {D.memory_budget:g})")
    r.add_argument("--score-batch", type=int, default=D.score_batch, metavar="N",
                   help=f"training images per scoring step, at most (default: {D.score_batch})")
    x = p.add_argument_group("scale-out (needs Ray: pip install -r requirements-distributed.txt)")
    x.add_argument("--workers", type=int, default=D.workers, metavar="N",
                   help="start a local Ray runtime with N workers (one GPU each when there are GPUs) that fit "
                        "kfac/ekfac/pcg curvature and score the training archive in shards; with --ray-address, "
                        "at most N tasks at once (default: 0 = no Ray, one process)")
    x.add_argument("--ray-address", default=D.ray_address, metavar="ADDR",
                   help="join a running Ray cluster (`ray start --head` prints ADDR, host:6379) instead of starting "
                        "one; every node must see --data and --out at the same paths (default: none)")
    p.add_argument("-v", "--verbose", action="store_true", help="more log messages")
    return p


def job(args):
    from influence.cli import import_tensorflow_quietly
    from influence.engine import calculate

    import_tensorflow_quietly()

    return calculate(Settings.from_args(args))
