"""Command lines of ``prepare_data.py`` and ``prepare_only_test.py`` (the original's -tr/-ts/-bs kept);
the jobs themselves are :func:`influence.data.prepare.prepare_data` / ``prepare_only_test``."""
from influence.cli import Parser
from influence.data.classes import ORDERS
from influence.data.images import DEFAULT_RESAMPLE, RESAMPLE
from influence.data.prepare import DEFAULT_BATCH, DEFAULT_SEED, DEFAULT_SIZE



def _add_common(parser):
    parser.add_argument("--size", nargs="+", metavar="N",
                        help=f"resize images to N x N, or to H W (default {DEFAULT_SIZE})")
    parser.add_argument("--out", default=".", metavar="DIR",
                        help="folder for the archives and labels.json (default: .)")
    parser.add_argument("--workers", default=None, metavar="K",
                        help="decoding processes (default: number of CPUs)")
    parser.add_argument("--resample", default=DEFAULT_RESAMPLE, choices=list(RESAMPLE),
                        help="resizing filter (default: nearest, as the original tool's Keras "
                             "load_img)")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log messages")


def build_prepare_data_parser():
    """Parser of ``prepare_data.py`` (the original tool's -tr/-ts/-bs kept)."""
    p = Parser(prog="prepare_data.py",
                description="Pack image folders into train.npz / test.npz archives.")
    p.add_argument("-tr", "--train", required=True, metavar="DIR",
                   help="train folder: one subfolder per class (ImageNet wnids or any names)")
    p.add_argument("-ts", "--test", nargs="+", default=[], metavar="DIR",
                   help="test folders, each with subfolders named by class index (0..999) or "
                        "by train class name")
    p.add_argument("-bs", "--batch-size", default=str(DEFAULT_BATCH), metavar="N",
                   help=f"images per train archive batch (default {DEFAULT_BATCH})")
    p.add_argument("--seed", default=str(DEFAULT_SEED), metavar="S",
                   help=f"seed of the train shuffle (default {DEFAULT_SEED})")
    p.add_argument("--class-order", default="numeric", choices=ORDERS,
                   help="classes named by integers: numeric = the integer is the index (default); "
                        "keras = position in text order (10 before 2), as Keras' "
                        "image_dataset_from_directory")
    _add_common(p)
    return p


def build_prepare_only_test_parser():
    """Parser of ``prepare_only_test.py``."""
    p = Parser(prog="prepare_only_test.py",
                description="Pack test folders into test.npz, reusing labels.json if present.")
    p.add_argument("-ts", "--test", nargs="+", required=True, metavar="DIR",
                   help="test folders, each with subfolders named by class index (0..999) or "
                        "by train class name (needs labels.json)")
    p.add_argument("--labels", default=None, metavar="PATH",
                   help="labels.json of the train set (default: OUT/labels.json if present)")
    p.add_argument("-bs", "--batch-size", default=str(DEFAULT_BATCH), metavar="N",
                   help=f"images decoded per block (default {DEFAULT_BATCH})")
    _add_common(p)
    return p
