"""The fitted state of K-FAC / EK-FAC: the factors' eigendecompositions, EK-FAC's corrected
eigenvalues, the regulariser's diagonal in the eigenbasis, and their cache form.

From pass 1's sums (:mod:`influence.curvature.kfac_passes`) each factor block is eigendecomposed in
float64, ``A = Q_A diag(e_A) Q_Aᵀ`` and ``S = Q_S diag(e_S) Q_Sᵀ`` (:meth:`FittedState.set_factors`);
pass 2's sums divided by ``n`` are EK-FAC's ``Λ`` (:meth:`FittedState.set_lambda`). The undamped
eigenvalues of a Kronecker layer's ``F + R`` (:meth:`FittedState._undamped`, ``(K1, C)``)::

    K-FAC:   Λ_ij = e_A,i · e_S,j     (negative eigenvalues of A and S clipped to 0)
    EK-FAC:  Λ_ij = (1/n) Σ_n [(Q_Aᵀ G_n Q_S)_ij]²
    both:    + ρ_i,  ρ_i = Σ_k Q_A[k,i]² r_k   (the L2 regulariser's diagonal, kfac_plan)

and of a diagonal layer ``E[g²] + 2c`` per parameter.

Fitted state (``state()``; keys per layer name ``L``): ``L.QA.b`` / ``L.eA.b`` (eigenvectors and
eigenvalues of block ``b`` of ``A``), ``L.QS.b`` / ``L.eS.b`` (the same for ``S``), ``L.Lambda``
(EK-FAC: ``(K+1, C_out)``) and ``L.diag`` (diagonal layers: ``E[g²]`` over the layer's variables,
flattened in order). The damping is not in the state.
"""
import gc
import math

import numpy as np

from influence.curvature.kfac_plan import DiagBlock, KronBlock, block_entries


class FittedState:
    """Mixin of :class:`influence.curvature.ekfac.KFACSolver`: ``_eig``, ``_lambda``, ``_diag``, ``_rho``.

    Reads from the solver: ``obj``, ``plan``, ``name``, ``corrected``, ``info``, ``_compute_dtype``;
    :meth:`compact` forms the damped eigenvalues (``_damped``) and drops the self-influence graph.
    """

    def set_factors(self, sums, n=None):
        """Eigendecompose the factors from pass-1 ``sums`` (consumed: each is freed once used) over
        ``n`` images (default: the whole archive). Ends K-FAC's fit; EK-FAC needs :meth:`set_lambda`.

        One block at a time: the block's sum (scaled in place when writable), its symmetrised copy,
        numpy's ``eigh`` copy and workspace (``syevd``: about ``2 b²``) and the eigenvectors
        (:func:`eigh_workspace_bytes`).
        """
        n = self.obj.n if n is None else n
        self._eig = {}
        self._diag = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                parts = {}
                for which, bounds in (("A", b.a_bounds), ("S", b.s_bounds)):
                    qs, es = [], []
                    for i in range(len(bounds)):
                        m = sums.pop(f"{b.name}.{which}.{i}")
                        if m.flags.writeable and m.dtype == np.float64:
                            m /= n
                        else:
                            m = m / n
                        sym = m + m.T
                        del m
                        sym *= 0.5
                        e, q = np.linalg.eigh(sym)
                        del sym
                        qs.append(q)
                        es.append(e)
                    parts[which] = (qs, es)
                self._eig[b.name] = {"QA": parts["A"][0], "eA": parts["A"][1],
                                     "QS": parts["S"][0], "eS": parts["S"][1]}
            else:
                self._diag[b.name] = np.concatenate([sums.pop(f"{b.name}.diag.{i}").ravel()
                                                     for i in range(len(b.shapes))]) / n
        self._lambda = {}

    def eigenbasis(self):
        """``{layer: {"QA": [...], "QS": [...]}}``: what pass 2 needs from pass 1 (after :meth:`set_factors`)."""
        return {b.name: {"QA": self._eig[b.name]["QA"], "QS": self._eig[b.name]["QS"]}
                for b in self.plan if isinstance(b, KronBlock)}

    def set_lambda(self, sums, n=None):
        """EK-FAC's corrected eigenvalues from pass-2 ``sums`` over ``n`` images (default: all); the
        sums are consumed (divided in place when writable)."""
        n = self.obj.n if n is None else n
        self._lambda = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                lam = sums.pop(f"{b.name}.Lambda")
                if lam.flags.writeable and lam.dtype == np.float64:
                    lam /= n
                else:
                    lam = lam / n
                self._lambda[b.name] = lam

    def fit_from(self, factor_sums, eigen_sums):
        """Fit from summed statistics, however they were summed (one process, or Ray shards).

        ``factor_sums()`` -> pass 1's ``{key: float64 array}`` (as :meth:`factor_sums`); then the float64
        eigendecompositions, one block at a time; ``eigen_sums()`` -> pass 2's sums in this solver's
        eigenbasis (as :meth:`eigen_sums`; :meth:`eigenbasis` gives it to other processes), EK-FAC only.
        """
        self.set_factors(factor_sums())
        if self.corrected:
            self.set_lambda(eigen_sums())
        self._finish()

    def _finish(self):
        """The regulariser's diagonal ``ρ`` per Kronecker layer, and the range of ``Λ + ρ`` for the log.

        ``Λ + ρ + λ`` itself is formed once per damping by :meth:`_damped`, in the model's dtype.
        """
        self._rho = {}
        low, high = math.inf, -math.inf
        for b in self.plan:
            if isinstance(b, KronBlock):
                rho = np.empty(b.k1)
                for (s, e), q in zip(b.a_bounds, self._eig[b.name]["QA"]):
                    rho[s:e] = (q * q).T @ b.reg_rows[s:e]
                self._rho[b.name] = rho
            if isinstance(b, KronBlock) and self.corrected:
                # in row blocks: no (K1, C) float64 temporary (fc1 of VGG16: 0.77 GiB) just for the log
                lam, rho = self._lambda[b.name], self._rho[b.name]
                for s in range(0, b.k1, 1024):
                    part = lam[s:s + 1024] + rho[s:s + 1024, None]
                    low, high = min(low, float(part.min())), max(high, float(part.max()))
                    del part
                continue
            den = self._undamped(b)
            low, high = min(low, float(den.min())), max(high, float(den.max()))
            del den
        self.info.update(fisher_min=low if self.plan else 0.0, fisher_max=high if self.plan else 0.0)
        self._dens = None
        self._fits += 1
        self._fitted = True

    def _undamped(self, b):
        """``Λ + ρ`` of block ``b``, float64 (Kronecker: (K1, C); diagonal: (size,)); a new array."""
        if isinstance(b, DiagBlock):
            return self._diag[b.name] + b.reg
        if self.corrected:
            return self._lambda[b.name] + self._rho[b.name][:, None]
        eig = self._eig[b.name]
        lam = np.outer(np.clip(np.concatenate(eig["eA"]), 0, None), np.clip(np.concatenate(eig["eS"]), 0, None))
        lam += self._rho[b.name][:, None]
        return lam

    @property
    def resident_bytes(self):
        """Bytes held between test vectors after :meth:`compact`: eigenvectors and ``Λ + ρ + λ`` in
        the model's dtype."""
        item = np.dtype(self._compute_dtype.as_numpy_dtype).itemsize
        total = 0
        for b in self.plan:
            if isinstance(b, KronBlock):
                total += item * (block_entries(b.a_bounds, b.s_bounds) + b.k1 * b.c_out)
            else:
                total += item * b.size
        return total

    def compact(self):
        """Keep only what :meth:`solve` needs: the eigenvectors and ``Λ + ρ + λ`` in the model's dtype.

        Frees the float64 eigenvectors (VGG16 ``--params all``: 1.8 GB), ``Λ`` and the eigenvalues;
        call it once the state is cached. :meth:`state` is refused afterwards.
        """
        if not self._fitted or self._compacted:
            return
        # the eigenvectors first, one block at a time (float64 freed as its copy is made), then Λ + ρ + λ
        # from Λ and the eigenvalues, then those: the float64 eigenvectors and Λ are never held together
        # with the damped copy and its float64 temporary
        dtype = self._compute_dtype.as_numpy_dtype
        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = self._eig[b.name]
                for key in ("QA", "QS"):
                    qs = eig[key]
                    for i in range(len(qs)):
                        qs[i] = np.ascontiguousarray(qs[i], dtype)
        self._compacted = True          # state() is refused from here on, whatever happens below
        self._damped()
        for b in self.plan:
            if isinstance(b, KronBlock):
                self._eig[b.name] = {"QA": self._eig[b.name]["QA"], "QS": self._eig[b.name]["QS"]}
        self._lambda, self._diag = {}, {}
        self._self_vars, self._self_key, self._self_fn = None, None, None
        self._compacted = True
        gc.collect()

    # --- cache -----------------------------------------------------------------------------------------
    def state(self):
        if not self._fitted:
            self.fit()
        if self._compacted:
            raise RuntimeError(f"{self.name}: state() after compact(); cache the state before compacting")
        out = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = self._eig[b.name]
                for key in ("QA", "eA", "QS", "eS"):
                    for i, arr in enumerate(eig[key]):
                        out[f"{b.name}.{key}.{i}"] = arr
                if self.corrected:
                    out[f"{b.name}.Lambda"] = self._lambda[b.name]
            else:
                out[f"{b.name}.diag"] = self._diag[b.name]
        return out

    def load_state(self, arrays):
        self._eig, self._diag, self._lambda = {}, {}, {}
        self._compacted = False

        def get(key, shape):
            if key not in arrays:
                raise ValueError(f"cached {self.name} state has no {key}")
            arr = np.asarray(arrays[key], dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"cached {key} is {arr.shape}, expected {shape}")
            return arr

        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = {}
                for key, bounds in (("QA", b.a_bounds), ("QS", b.s_bounds)):
                    eig[key] = [get(f"{b.name}.{key}.{i}", (e - s, e - s)) for i, (s, e) in enumerate(bounds)]
                    ek = "e" + key[1]
                    eig[ek] = [get(f"{b.name}.{ek}.{i}", (e - s,)) for i, (s, e) in enumerate(bounds)]
                self._eig[b.name] = eig
                if self.corrected:
                    self._lambda[b.name] = get(f"{b.name}.Lambda", (b.k1, b.c_out))
            else:
                self._diag[b.name] = get(f"{b.name}.diag", (b.size,))
        self._finish()

    # --- the factors themselves (dense, for checks) ----------------------------------------------------
    def kronecker_factors(self):
        """{layer name: (A (K1, K1), S (C, C))} dense float64, block-diagonal when split (after fit)."""
        out = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = self._eig[b.name]
                mats = []
                for qk, ek, size, bounds in (("QA", "eA", b.k1, b.a_bounds), ("QS", "eS", b.c_out, b.s_bounds)):
                    m = np.zeros((size, size))
                    for (s, e), q, w in zip(bounds, eig[qk], eig[ek]):
                        m[s:e, s:e] = (q * w) @ q.T
                    mats.append(m)
                out[b.name] = tuple(mats)
        return out
