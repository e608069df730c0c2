"""The self-influence files: ``self_influence.csv`` (every scored training image, highest first) and
``self_influence.<fmt>`` (the top ``k`` with label and prediction). The numbers come from
:func:`influence.scoring.self_influence.self_influence`."""
import csv
import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from influence.io import atomic_write
from influence.outputs.figure_style import (COLOURS, check_format, format_score, save_figure, short_class,
                                            short_file, show)

#: Header of ``self_influence.csv``.
CSV_HEADER = ("rank", "key", "file", "label", "class_name", "prediction", "prediction_name", "confidence",
              "self_influence", "loss")
CSV_NAME = "self_influence.csv"
FIGURE_STEM = "self_influence"


def expected_outputs(out_dir, fmt):
    """``[self_influence.csv, self_influence.<fmt>]`` inside ``out_dir``."""
    check_format(fmt)
    out = pathlib.Path(out_dir)
    return [out / CSV_NAME, out / f"{FIGURE_STEM}.{fmt}"]


def write_self_influence(out_dir, result, catalogue, fetch_image, *, top, fmt):
    """Write ``self_influence.csv`` and the figure ``self_influence.<fmt>`` into ``out_dir``, atomically.

    Args:
      out_dir: the run's output folder (created if missing).
      result: a :class:`SelfInfluence`.
      catalogue: the WHOLE training archive (:class:`influence.catalogue.TrainCatalogue`: ``keys``
        ``"{batch}_{index}"``, ``files``, ``labels`` class indices, ``namer`` callable int -> str).
      fetch_image: callable(global index) -> uint8 (H, W, 3); called for the ``top`` shown images only.
      top: images in the figure (clipped to the scored ones).
      fmt: figure format, one of :data:`influence.outputs.figure_style.FIGURE_FORMATS`.

    Returns:
      ``[csv path, figure path]``. The CSV has every scored image, sorted by self-influence descending.
    """
    csv_path, fig_path = expected_outputs(out_dir, fmt)
    keys, files, labels, class_name = catalogue.keys, catalogue.files, catalogue.labels, catalogue.namer
    order = result.ranking()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(csv_path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_HEADER)
            for rank, j in enumerate(order.tolist(), start=1):
                i = int(result.indices[j])
                label, pred = int(labels[i]), int(result.preds[j])
                writer.writerow([rank, keys[i], str(files[i]), label, class_name(label), pred, class_name(pred),
                                 repr(float(result.confs[j])), repr(float(result.values[j])),
                                 repr(float(result.losses[j]))])
    panels = []
    for rank, j in enumerate(order[:max(0, int(top))].tolist(), start=1):
        i = int(result.indices[j])
        panels.append({"image": fetch_image(i), "rank": rank, "value": float(result.values[j]),
                       "label": class_name(int(labels[i])), "pred": class_name(int(result.preds[j])),
                       "wrong": int(labels[i]) != int(result.preds[j]), "conf": float(result.confs[j]),
                       "loss": float(result.losses[j]), "file": str(files[i])})
    fig = _figure(panels, len(order), len(keys))
    save_figure(fig, fig_path, fmt)
    return [csv_path, fig_path]


def _figure(panels, scored, total, cols=5):
    """The top self-influence images, ``cols`` a row: rank, value, label, prediction (red when they differ)."""
    rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(2.3 * min(max(len(panels), 1), cols), 3.0 * rows + 0.7), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(rows, min(max(len(panels), 1), cols))
    for k, p in enumerate(panels):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        show(ax, p["image"], COLOURS["wrong"] if p["wrong"] else COLOURS["test"])
        ax.set_title(f"#{p['rank']}  self-inf. {format_score(p['value'])}\nlabel: {short_class(p['label'], 18)}\n"
                     f"pred: {short_class(p['pred'], 14)} ({100 * p['conf']:.0f}%)\n{short_file(p['file'])}",
                     fontsize=9, color=COLOURS["wrong"] if p["wrong"] else "black")
    if not panels:
        ax = fig.add_subplot(grid[0, 0])
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no training images", ha="center", va="center", fontsize=10)
    what = f"{scored} highest-loss of {total}" if scored < total else f"all {total}"
    fig.suptitle(f"Highest self-influence training images ({what} scored)", fontsize=12, fontweight="bold")
    fig.supxlabel("self-influence = ∇L(z)ᵀ(H + λI)⁻¹∇L(z) with the image's own label: high = the rest of the "
                  "training set argues against it (check the label); red = the model predicts another class",
                  fontsize=8, style="italic", color="0.35", wrap=True)
    return fig
