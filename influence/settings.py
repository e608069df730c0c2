"""The settings of a calculate run: one dataclass, saved in run.json, and which of them change the numbers.

Field names match calculate.py's long options (the CLI maps flags onto them, and shows a
:class:`influence.errors.SettingError` of a field as its flag); :mod:`influence.engine`
runs a job from a :class:`Settings`; :mod:`influence.distributed` sends them to its workers.
"""
import dataclasses

from influence.errors import SettingError

#: settings that change the numbers: a resumed run must agree on them
MATH_SETTINGS = ("model", "weights", "preprocess", "params", "solver", "hessian", "damping", "scale", "iter", "bsize",
                 "repeats", "seed", "cg_tol", "cg_maxiter", "fisher", "ekfac_max_block")


@dataclasses.dataclass
class Settings:
    """Every setting of a run (saved in run.json). Field names match calculate.py's options."""

    data: str = "."
    out: str = "calc_output"
    model: str = "vgg16"
    weights: str = "imagenet"
    preprocess: str = "auto"
    params: str = "all"
    solver: str = "lissa"
    hessian: str = "ggn"        # the LDS panel: cg 0.079 (full, the least damping that runs) -> 0.37 (ggn)
    iter: int = 1000
    bsize: int = 10
    repeats: int = 1
    damping: object = "auto"    # 0.1 x the curvature's mean eigenvalue (per layer for kfac/ekfac)
    scale: str = "auto"
    seed: int = 0
    cg_tol: float = 1e-6
    cg_maxiter: int = 200
    fisher: str = "sampled"
    ekfac_max_block: int = 4096
    cache: str = None
    self_influence: bool = False
    self_influence_limit: int = 0
    max_exact_params: int = 10_000
    top: int = 5
    save_format: str = "pdf"
    folders: list = None
    limit: int = 0
    overwrite: bool = False
    memory_budget: float = 2.0
    score_batch: int = 256
    workers: int = 0
    ray_address: str = None

    @classmethod
    def from_args(cls, args):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

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
