"""The ``truth`` section of ``benchmarks/run.py``: truth per second, read from the LDS panels' last runs.

Nothing is run: each ``docs/lds*.json`` (written by ``make lds``) gives per solver its LDS and compute,
and the dense GGN's rows; the section records them, with each solver's compute over cg's.
"""
from harness import REPO, record, say


def bench_truth(args):
    """Truth per second from the LDS panels' last runs (``docs/lds*.json``, written by ``make lds``):
    per solver its LDS, its compute, the distance to the dense GGN at calculate.py's damping, and its
    compute over cg's."""
    import json

    files = sorted((REPO / "docs").glob("lds*.json"))
    if not files:
        raise RuntimeError("no docs/lds*.json: run the LDS panels first (python -m influence.validate --panels lds "
                           "--out docs/validate.png [--lds-model bn])")
    for path in files:
        panel = json.loads(path.read_text())
        rows = {r["name"]: r for r in panel["rows"]}
        model = panel.get("model", "demo")
        dense = [r for r in panel["rows"] if r["name"].startswith("dense")]
        cg = rows.get("cg")
        say(f"[truth] {path.name}: {model}, {len(panel['test_keys'])} test images, {panel['subsets']} subsets")
        for r in panel["rows"]:
            if r["lds_mean"] is None or r["name"].startswith("dense") or r["name"] == "random":
                continue
            note = f"LDS {r['lds_mean']:.3f}, compute {r['compute']:.0f} s"
            if cg and cg.get("compute") and r["name"] != "gradient dot product":
                note += f", {r['compute'] / cg['compute']:.2f} x cg's compute"
            record(f"truth ({model})", r["name"], r["lds_mean"], "LDS", note=note)
        for r in dense:
            record(f"truth ({model})", r["name"] + " " + r["options"].split(" (")[0], r["lds_mean"], "LDS")
