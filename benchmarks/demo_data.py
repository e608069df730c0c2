"""The demo data the sections run on: ``demo/`` when ``make demo`` built it, else the same built in a
temporary folder (folders, archives and the trained model). Used by the ``calculate``, ``krylov`` and
``outputs`` sections and by ``benchmarks/curvature.py`` and ``benchmarks/distributed.py``.
"""
import subprocess
import time

from harness import REPO, last_lines, say

# the model of the calculate section when demo/ is missing: the demo's own (`make demo`: 1 500 images,
# 30 epochs, about 20 s here). Trained for 3 epochs on 500 images it was far from a minimum
# (λ_min(H) = -3.5 against λ = 0.01) and LiSSA diverged at step 229 of -i 300; this one has
# λ_min(H) = -0.001 > -λ (Lanczos on the whole set) and LiSSA -i 300 -b 32 runs through.
DEMO_TRAIN, DEMO_EPOCHS = 1500, 30


def build_demo_data(root, n_train=DEMO_TRAIN, epochs=DEMO_EPOCHS):
    """Build the demo's folders, archives and trained model under ``root`` (as ``make demo`` does)."""
    from influence.experiments import demo

    data = demo.write_folders(root, n_train=n_train)
    model, _ = demo.train_model(*data["train"][:2], epochs=epochs)
    model.save(root / "model.keras")
    argv, _, _ = demo.command(demo.COMMANDS[0], str(root))
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:  # the caller's section reports it as a failure, with these lines
        raise RuntimeError(f"prepare_data.py exited with code {done.returncode} building {root}:\n"
                           + "\n".join(last_lines(done.stderr)))
    return root


def demo_data(tmp):
    """The demo folder (``demo/`` if complete, else one built under ``tmp`` as ``make demo`` builds it:
    a model trained to near a minimum, so that LiSSA at λ = 0.01 converges on it)."""
    root = REPO / "demo"
    if all((root / f).exists() for f in ("train.npz", "test.npz", "model.keras")):
        return root
    root = tmp / "demo"
    t0 = time.perf_counter()
    say(f"  demo/ is missing: building it in {root} ({DEMO_TRAIN} images, {DEMO_EPOCHS} epochs)")
    build_demo_data(root, DEMO_TRAIN, DEMO_EPOCHS)
    say(f"  built in {time.perf_counter() - t0:.0f} s")
    return root
