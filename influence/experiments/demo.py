"""One-command demo on the bundled hand-written digits: ``python -m influence.demo [--root demo]``.

Steps, as a user would take them:
  1. write image folders: ``<root>/train/<class>/<id>.png`` and the test folders ``<root>/orig``,
     ``<root>/noisy`` (seeded Gaussian noise) and ``<root>/inverted`` (dark ink on light), each with
     class folders ``0``..``9`` holding the same held-out images;
  2. train a small CNN (logits out, input float RGB in [0, 1]) and save ``<root>/model.keras``;
  3. run ``prepare_data.py`` and ``calculate.py`` (the command lines are in ``COMMANDS`` below).

``--quick`` trains on fewer images for fewer epochs (for tests and a fast look).
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from influence.data import digits
from influence.progress import progress

REPO = Path(__file__).resolve().parents[2]   # the repository root: prepare_data.py, calculate.py

# The two script calls, exactly as a user would type them; "{root}" is replaced by --root.
COMMANDS = [
    ["prepare_data.py", "-tr", "{root}/train", "-ts", "{root}/orig", "{root}/noisy",
     "{root}/inverted", "-bs", "200", "--size", "32", "32", "--out", "{root}"],
    ["calculate.py", "--data", "{root}", "--model", "{root}/model.keras", "--preprocess", "unit",
     "--self-influence", "-sf", "png", "--out", "{root}/calc_output"],
]
TEST_FOLDERS = ("orig", "noisy", "inverted")
SIZE = 32
NOISE_STD = 48.0  # Gaussian noise on the 0..255 scale for the "noisy" folder
SEED = 0


def make_test_variants(rgb, seed=SEED):
    """Test-folder variants of uint8 (N, H, W, 3) images: dict name -> uint8 (N, H, W, 3).

    "orig" as is, "noisy" with seeded Gaussian noise (std ``NOISE_STD``) clipped to 0..255,
    "inverted" as 255 - pixel (dark ink on a light background: unlike anything in training).
    """
    rng = np.random.default_rng(seed)
    noisy = rgb.astype(np.float64) + rng.normal(0.0, NOISE_STD, size=rgb.shape)
    return {
        "orig": rgb,
        "noisy": np.rint(noisy).clip(0, 255).astype(np.uint8),
        "inverted": (255 - rgb).astype(np.uint8),
    }


def _clear_image_folder(folder):
    """Remove the PNGs this demo writes (``folder/<0..9>/*.png``) and then empty class folders."""
    for c in range(digits.N_CLASSES):
        sub = folder / str(c)
        if sub.is_dir():
            for png in sub.glob("*.png"):
                png.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()


def _write_pngs(folder, rgb, labels, ids, desc):
    """Write uint8 (N, H, W, 3) images as ``folder/<label>/<id:04d>.png``."""
    _clear_image_folder(folder)
    for c in range(digits.N_CLASSES):
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
    for img, label, i in progress(list(zip(rgb, labels, ids)), desc=desc, leave=False, unit="img"):
        Image.fromarray(img).save(folder / str(int(label)) / f"{int(i):04d}.png")


def write_folders(root, n_train=1500, per_class=1, seed=SEED):
    """Write the demo image folders under ``root``; return the arrays that were written.

    Train: ``n_train`` images (seeded, class-balanced split). Test: ``per_class`` held-out images of
    each class, the same ones in every test folder. Returns a dict with "train" and each test
    folder name -> ``(rgb uint8 (N, 32, 32, 3), labels int64 (N,), ids int64 (N,))``, plus "heldout"
    (every held-out image, unmodified, for an accuracy figure; not written to disk).
    """
    root = Path(root)
    images, target = digits.load_digits()
    train_idx, test_idx = digits.split(target, seed=seed, n_test=len(target) - n_train)
    n_test = per_class * digits.N_CLASSES
    if n_test > len(test_idx):
        raise ValueError(f"per_class={per_class} needs {n_test} held-out images, have {len(test_idx)}")
    shown = test_idx[:n_test]  # per_class images of each class, by construction of split()
    out = {"train": (digits.to_rgb(images[train_idx], SIZE), target[train_idx], train_idx)}
    for name, rgb in make_test_variants(digits.to_rgb(images[shown], SIZE), seed).items():
        out[name] = (rgb, target[shown], shown)
    out["heldout"] = (digits.to_rgb(images[test_idx], SIZE), target[test_idx], test_idx)
    for name in ("train",) + TEST_FOLDERS:
        _write_pngs(root / name, *out[name], desc=f"writing {name}")
    return out


def build_model(seed=SEED):
    """Small CNN: float (None, 32, 32, 3) in [0, 1] -> logits (None, 10); L2 1e-4 on kernels."""
    import keras

    keras.utils.set_random_seed(seed)
    l2 = keras.regularizers.L2(1e-4)
    return keras.Sequential([
        keras.Input((SIZE, SIZE, 3)),
        keras.layers.Conv2D(8, 3, activation="relu", kernel_regularizer=l2, name="conv1"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, activation="relu", kernel_regularizer=l2, name="conv2"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(digits.N_CLASSES, kernel_regularizer=l2, name="logits"),
    ], name="digits_cnn")


def train_model(rgb, labels, epochs=30, seed=SEED, verbose=0):
    """Fit :func:`build_model` on uint8 (N, 32, 32, 3) images / 255 and int labels (N,).

    Returns ``(model, seconds)``. Seeded: the same inputs give the same weights on one machine.
    """
    import keras

    model = build_model(seed)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x = rgb.astype(np.float32) / 255.0
    start = time.perf_counter()
    model.fit(x, np.asarray(labels), batch_size=32, epochs=epochs, shuffle=True, verbose=verbose)
    return model, time.perf_counter() - start


def accuracy(model, rgb, labels):
    """Fraction of uint8 (N, 32, 32, 3) images whose argmax logit equals the label (N,)."""
    logits = model.predict(rgb.astype(np.float32) / 255.0, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


def command(template, root):
    """Fill ``{root}`` in a ``COMMANDS`` entry; return (argv to run, line to show)."""
    args = [a.replace("{root}", root) for a in template[1:]]
    script = REPO / template[0]
    shown = shlex.join(["python", os.path.relpath(script)] + args)
    return [sys.executable, str(script)] + args, shown, script


def run_scripts(root):
    """Run the ``COMMANDS`` one after the other, printing each line first; return an exit code."""
    for template in COMMANDS:
        argv, shown, script = command(template, root)
        if not script.is_file():
            print(f"demo stopped: {template[0]} is not there yet ({script}); the images and the "
                  f"model are ready under {root}/", file=sys.stderr)
            return 1
        print(f"\n$ {shown}", flush=True)
        code = subprocess.call(argv)
        if code != 0:
            print(f"demo stopped: {template[0]} exited with code {code}", file=sys.stderr)
            return code
    return 0


def main(argv=None):
    """Write the folders, train, run the scripts, say where the figures are. Returns an exit code."""
    parser = argparse.ArgumentParser(prog="python -m influence.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="demo", help="folder for images, model and results "
                        "(default: demo)")
    parser.add_argument("--quick", action="store_true", help="fewer training images and epochs")
    args = parser.parse_args(argv)
    from influence.cli import import_tensorflow_quietly, setup_logging

    setup_logging()          # progress lines of the demo's own steps, when the output is not a terminal
    import_tensorflow_quietly()
    root = args.root.rstrip("/") or "."
    n_train, epochs = (500, 8) if args.quick else (1500, 30)

    print(f"writing {n_train} training images and {len(TEST_FOLDERS)} test folders under {root}/")
    data = write_folders(root, n_train=n_train)
    print(f"training a small CNN on {n_train} images for {epochs} epochs ...", flush=True)
    model, seconds = train_model(*data["train"][:2], epochs=epochs)
    print(f"trained in {seconds:.1f} s ({model.count_params()} parameters)")
    heldout = data["heldout"]
    print(f"  accuracy on all {len(heldout[1])} held-out images: "
          f"{accuracy(model, *heldout[:2]):.1%}")
    for name in TEST_FOLDERS:
        rgb, labels, _ = data[name]
        print(f"  accuracy on {root}/{name} ({len(labels)} images): "
              f"{accuracy(model, rgb, labels):.1%}")
    model_path = Path(root) / "model.keras"
    model.save(model_path)
    print(f"saved {model_path}")

    old_results = Path(root) / "calc_output"
    if old_results.exists():  # scores of an earlier model would otherwise be resumed, not redone
        print(f"removing the results of an earlier demo run: {old_results}/")
        shutil.rmtree(old_results)
    code = run_scripts(root)
    if code != 0:
        return code
    out = Path(root) / "calc_output"
    print(f"\ndone: figures and scores are under {out}/ (one folder per test folder, one per class)")
    for name in TEST_FOLDERS:
        wrong = _misclassified(out / name / f"{name}_preds.csv")
        if wrong:
            print(f"  {name}: {len(wrong)} misclassified; look first at:")
            for label, n, pred in wrong[:2]:
                print(f"    {out / name / label / f'harmful_{n}.png'}   (true {label}, predicted {pred})")
    print(f"  every test image: {out}/<folder>/<class>/harmful_<n>.png and useful_<n>.png")
    print(f"  the whole run in one page: {out}/index.html; training images that look mislabelled: "
          f"{out}/self_influence.csv")
    return 0


def _misclassified(preds_csv):
    """[(label, n, prediction)] of the wrong predictions in a ``<folder>_preds.csv``; n counts per label from 1."""
    import csv

    if not preds_csv.exists():
        return []
    seen, wrong = {}, []
    with open(preds_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            n = seen.get(row["label"], 0) + 1
            seen[row["label"]] = n
            if row["label"] != row["prediction"]:
                wrong.append((row["label"], n, row["prediction"]))
    return wrong


if __name__ == "__main__":
    sys.exit(main())
