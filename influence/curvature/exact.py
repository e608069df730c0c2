"""``--solver exact``: the dense ``H`` from one HVP per parameter, solved in float64 (small models)."""
import logging

import numpy as np

from influence.curvature.base import InverseHVP
from influence.errors import SettingError
from influence.model.vectors import numpy_to_vec, vec_size, vec_to_numpy
from influence.progress import progress as progress_bar

log = logging.getLogger(__name__)


class ExactSolver(InverseHVP):
    """Dense ``H`` (float64) built once over the whole training set; refuses more than ``max_params``.

    The cached state is ``H`` without damping, so a rerun with another ``--damping`` reuses it.
    """

    name = "exact"
    summary = "dense Hessian solved in float64 (small models, the reference)"
    approximates = "hessian"   # what the contract test (tests/test_curvature_contract.py) compares with
    relative_damping = "trace"   # λ = factor × trace(H)/P (influence.curvature.damping)
    takes_diagonal = True        # damping optimizer: H + c·D, the diagonal exactly (base.response_diagonal)

    def __init__(self, objective, damping, max_exact_params=10_000, progress=True):
        super().__init__(objective, damping, progress)
        self.max_params = int(max_exact_params)
        self._hessian = None
        self._matrix = None
        self._inverse = None      # (the matrix it inverts, the symmetrised inverse): self-influence

    def cache_key(self):
        return self.matrix_key()

    def _check_size(self):
        p = vec_size(self.obj.d.variables)
        if p > self.max_params:
            raise SettingError(
                "max_exact_params",
                f"solver exact needs a dense {p}x{p} Hessian: {p} parameters is above the limit of "
                f"{self.max_params} (raise it, choose fewer with params, or use solver ekfac, cg or lissa)"
            )
        return p

    def fit(self, sums=None):
        p = self._check_size()
        like = self.obj.d.variables
        h = np.zeros((p, p))
        eye = np.eye(p)
        for k in progress_bar(range(p), desc="exact Hessian", unit="col", disable=not self.progress):
            h[:, k] = vec_to_numpy(self.obj.hvp_full(numpy_to_vec(eye[k], like)))
        self._set_hessian(0.5 * (h + h.T))

    def state(self):
        return {"hessian": self._hessian}

    def load_state(self, arrays):
        p = self._check_size()
        h = np.asarray(arrays["hessian"], dtype=np.float64)
        if h.shape != (p, p):
            raise ValueError(f"cached Hessian is {h.shape}, expected {(p, p)}")
        self._set_hessian(h)

    def mean_eigenvalue(self):
        """The dense matrix's exact ``trace(H)/P`` (fits on first use)."""
        if self._hessian is None:
            self.fit()
        return float(np.trace(self._hessian)) / len(self._hessian), 0.0, 0

    def set_damping(self, damping):
        """λ changed: ``H + λI`` formed again from the held Hessian (:meth:`InverseHVP.set_damping`)."""
        self.damping = damping
        if self._hessian is not None:
            self._set_hessian(self._hessian)

    def _set_hessian(self, h):
        self._hessian = h
        diagonal = self.response_diagonal()
        a = h + self.damping * (np.eye(len(h)) if diagonal is None else np.diag(diagonal))
        w = np.linalg.eigvalsh(a)
        self.info.update(lambda_min=float(w[0]), lambda_max=float(w[-1]), num_params=len(h))
        if w[0] <= 0:
            log.warning("H + λI is not positive definite (smallest eigenvalue %.3g): raise damping, or use "
                        "hessian='ggn'", w[0])
        self._matrix = a

    @property
    def resident_bytes(self):
        """The float64 Hessian and ``H + λI``."""
        p = vec_size(self.obj.d.variables)
        return 2 * 8 * p * p

    def matrix(self):
        """(P, P) float64 ``H + λI``, symmetrised (fits on first use)."""
        if self._matrix is None:
            self.fit()
        return self._matrix

    self_influence_route = "dense inverse"

    def self_influence_batch(self, x, y):
        """``gᵢᵀ (H + λI)⁻¹ gᵢ`` of each image with its own label: images (N, H, W, C), (N,) -> float64 (N,).

        One tape per image for the gradients; ``(H + λI)⁻¹`` is inverted (and symmetrised) once per matrix.
        """
        a = self.matrix()
        if self._inverse is None or self._inverse[0] is not a:
            inv = np.linalg.inv(a)
            self._inverse = (a, 0.5 * (inv + inv.T))
        grads = self.image_gradients(x, y)
        return np.einsum("bp,bp->b", grads @ self._inverse[1], grads)

    def solve(self, vectors, ids=None):
        return self.solve_rows(lambda rows: np.linalg.solve(self.matrix(), rows.T).T, vectors)
