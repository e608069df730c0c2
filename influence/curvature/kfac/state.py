"""The fitted state of K-FAC / EK-FAC as one value, :class:`KroneckerFit`: the factors'
eigendecompositions, EK-FAC's corrected eigenvalues, the diagonal blocks and the regulariser's
diagonal in the eigenbasis -- everything the fit learnt, nothing that depends on the damping -- and
its array form, the one thing the curvature cache saves and loads.

From pass 1's sums (:mod:`influence.curvature.kfac.passes`) each factor block is eigendecomposed in
float64, ``A = Q_A diag(e_A) Q_Aᵀ`` and ``S = Q_S diag(e_S) Q_Sᵀ`` (:func:`fit_factors`); pass 2's
sums divided by ``n`` are EK-FAC's ``Λ`` (:meth:`KroneckerFit.with_lambda`). The undamped
eigenvalues of a Kronecker layer's ``F + R`` (:meth:`KroneckerFit.undamped`, ``(K1, C)``)::

    K-FAC:   Λ_ij = e_A,i · e_S,j     (negative eigenvalues of A and S clipped to 0)
    EK-FAC:  Λ_ij = (1/n) Σ_n [(Q_Aᵀ G_n Q_S)_ij]²
    both:    + ρ_i,  ρ_i = Σ_k Q_A[k,i]² r_k   (the L2 regulariser's diagonal, kfac_plan)

and of a diagonal layer ``E[g²] + 2c`` per parameter.

Array form (:meth:`KroneckerFit.to_arrays` / :meth:`KroneckerFit.from_arrays`; keys per layer name
``L``): ``L.QA.b`` / ``L.eA.b`` (eigenvectors ``(b, b)`` and eigenvalues ``(b,)`` of block ``b`` of
``A``), ``L.QS.b`` / ``L.eS.b`` (the same for ``S``), ``L.Lambda`` (EK-FAC: ``(K+1, C_out)``) and
``L.diag`` (diagonal layers: ``E[g²]`` over the layer's variables, flattened in order, ``(size,)``).
``ρ`` is derived from the eigenvectors and the plan, so it is not stored; nor is the damping.
"""
import gc
import math
from dataclasses import dataclass, field

import numpy as np

from influence.curvature.kfac.plan import DiagBlock, KronBlock, block_entries


@dataclass
class KroneckerFit:
    """A fitted K-FAC (``corrected=False``) or EK-FAC (``corrected=True``) over ``plan``'s blocks.

    Fields (float64 arrays, keyed by layer name):
      eig: Kronecker layers: ``{"QA": [(b, b)], "eA": [(b,)], "QS": [(b, b)], "eS": [(b,)]}``, one entry
        per diagonal block of the factor (``a_bounds`` / ``s_bounds``).
      lam: EK-FAC's ``Λ`` ``(K1, C)`` per Kronecker layer (empty for K-FAC).
      diag: ``E[g²]`` ``(size,)`` per diagonal layer.
      rho: the regulariser's diagonal ``ρ`` ``(K1,)`` per Kronecker layer (:func:`regulariser_diagonal`).
      compacted: :meth:`compact` ran: only the eigenvectors are left, in the model's dtype.

    Made once by :func:`fit_factors` (+ :meth:`with_lambda`) or :meth:`from_arrays` and not changed
    afterwards, except by :meth:`compact`, which consumes it in place.
    """

    plan: list
    corrected: bool
    eig: dict
    lam: dict = field(default_factory=dict)
    diag: dict = field(default_factory=dict)
    rho: dict = field(default_factory=dict)
    compacted: bool = False

    # --- derived values ---------------------------------------------------------------------------------
    def eigenbasis(self):
        """``{layer: {"QA": [...], "QS": [...]}}``: what pass 2 needs from pass 1."""
        return {b.name: {"QA": self.eig[b.name]["QA"], "QS": self.eig[b.name]["QS"]}
                for b in self.plan if isinstance(b, KronBlock)}

    def undamped(self, b):
        """``Λ + ρ`` of block ``b``, float64 (Kronecker: (K1, C); diagonal: (size,)); a new array."""
        try:
            if isinstance(b, DiagBlock):
                return self.diag[b.name] + b.reg
            if self.corrected:
                return self.lam[b.name] + self.rho[b.name][:, None]
            eig = self.eig[b.name]
            ea, es = eig["eA"], eig["eS"]
        except KeyError:
            raise RuntimeError(f"layer {b.name}: the eigenvalues are gone (compact())") from None
        lam = np.outer(np.clip(np.concatenate(ea), 0, None), np.clip(np.concatenate(es), 0, None))
        lam += self.rho[b.name][:, None]
        return lam

    def undamped_range(self):
        """``(min, max)`` of ``Λ + ρ`` over every block (``(0.0, 0.0)`` for an empty plan)."""
        low, high = math.inf, -math.inf
        for b in self.plan:
            if isinstance(b, KronBlock) and self.corrected:
                # in row blocks: no (K1, C) float64 temporary (fc1 of VGG16: 0.77 GiB) just for the range
                lam, rho = self.lam[b.name], self.rho[b.name]
                for s in range(0, b.k1, 1024):
                    part = lam[s:s + 1024] + rho[s:s + 1024, None]
                    low, high = min(low, float(part.min())), max(high, float(part.max()))
                    del part
                continue
            den = self.undamped(b)
            low, high = min(low, float(den.min())), max(high, float(den.max()))
            del den
        return (low, high) if self.plan else (0.0, 0.0)

    def kronecker_factors(self):
        """{layer name: (A (K1, K1), S (C, C))} dense float64, block-diagonal when split."""
        out = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = self.eig[b.name]
                mats = []
                for qk, ek, size, bounds in (("QA", "eA", b.k1, b.a_bounds), ("QS", "eS", b.c_out, b.s_bounds)):
                    m = np.zeros((size, size))
                    for (s, e), q, w in zip(bounds, eig[qk], eig[ek]):
                        m[s:e, s:e] = (q * w) @ q.T
                    mats.append(m)
                out[b.name] = tuple(mats)
        return out

    # --- the next step of a fit -------------------------------------------------------------------------
    def with_lambda(self, sums, n):
        """This K-FAC fit with EK-FAC's corrected eigenvalues from pass-2 ``sums`` over ``n`` images: a
        new value (``corrected=True``) sharing the eigendecompositions. The sums are consumed (divided in
        place when writable)."""
        lam = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                m = sums.pop(f"{b.name}.Lambda")
                if m.flags.writeable and m.dtype == np.float64:
                    m /= n
                else:
                    m = m / n
                lam[b.name] = m
        return KroneckerFit(self.plan, True, self.eig, lam, self.diag, self.rho)

    def compact(self, dtype, damp):
        """Keep only what solving needs: the eigenvectors in ``dtype`` (in place, one block at a time:
        each float64 block freed as its copy is made), then ``damp()`` (which forms ``Λ + ρ + λ`` from
        the eigenvalues still here), then drop the eigenvalues, ``Λ`` and the diagonal blocks.
        :meth:`to_arrays` and :meth:`undamped` are refused afterwards."""
        if self.compacted:
            return
        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = self.eig[b.name]
                for key in ("QA", "QS"):
                    qs = eig[key]
                    for i in range(len(qs)):
                        qs[i] = np.ascontiguousarray(qs[i], dtype)
        self.compacted = True       # to_arrays() is refused from here on, whatever happens below
        damp()
        for b in self.plan:
            if isinstance(b, KronBlock):
                self.eig[b.name] = {"QA": self.eig[b.name]["QA"], "QS": self.eig[b.name]["QS"]}
        self.lam, self.diag = {}, {}
        gc.collect()

    # --- the array form (the curvature cache) -----------------------------------------------------------
    def to_arrays(self):
        """``{key: float64 array}`` (keys in the module docstring); RuntimeError once compacted."""
        if self.compacted:
            raise RuntimeError("state() after compact(); cache the state before compacting")
        out = {}
        for b in self.plan:
            if isinstance(b, KronBlock):
                eig = self.eig[b.name]
                for key in ("QA", "eA", "QS", "eS"):
                    for i, arr in enumerate(eig[key]):
                        out[f"{b.name}.{key}.{i}"] = arr
                if self.corrected:
                    out[f"{b.name}.Lambda"] = self.lam[b.name]
            else:
                out[f"{b.name}.diag"] = self.diag[b.name]
        return out

    @classmethod
    def from_arrays(cls, plan, arrays, corrected, what="K-FAC"):
        """The fit :meth:`to_arrays` gave, for the same ``plan``; ValueError naming the key when one is
        missing or of another shape (``what`` names the solver in the message)."""
        def get(key, shape):
            if key not in arrays:
                raise ValueError(f"cached {what} state has no {key}")
            arr = np.asarray(arrays[key], dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"cached {key} is {arr.shape}, expected {shape}")
            return arr

        eigs, lam, diag = {}, {}, {}
        for b in plan:
            if isinstance(b, KronBlock):
                eig = {}
                for key, bounds in (("QA", b.a_bounds), ("QS", b.s_bounds)):
                    eig[key] = [get(f"{b.name}.{key}.{i}", (e - s, e - s)) for i, (s, e) in enumerate(bounds)]
                    ek = "e" + key[1]
                    eig[ek] = [get(f"{b.name}.{ek}.{i}", (e - s,)) for i, (s, e) in enumerate(bounds)]
                eigs[b.name] = eig
                if corrected:
                    lam[b.name] = get(f"{b.name}.Lambda", (b.k1, b.c_out))
            else:
                diag[b.name] = get(f"{b.name}.diag", (b.size,))
        return cls(plan, corrected, eigs, lam, diag, regulariser_diagonal(plan, eigs))


def regulariser_diagonal(plan, eig):
    """``{layer: ρ (K1,)}``, ``ρ_i = Σ_k Q_A[k,i]² r_k``: the L2 regulariser's diagonal in the eigenbasis
    of ``A`` (``eig``: :attr:`KroneckerFit.eig`; ``r``: the block's ``reg_rows``)."""
    out = {}
    for b in plan:
        if isinstance(b, KronBlock):
            rho = np.empty(b.k1)
            for (s, e), q in zip(b.a_bounds, eig[b.name]["QA"]):
                rho[s:e] = (q * q).T @ b.reg_rows[s:e]
            out[b.name] = rho
    return out


def fit_factors(plan, sums, n):
    """The K-FAC fit (``corrected=False``) from pass-1 ``sums`` over ``n`` images: each factor block
    eigendecomposed in float64, each diagonal layer's ``E[g²]``. The sums are consumed (each freed once
    used; scaled in place when writable).

    One block at a time: the block's sum, its symmetrised copy, numpy's ``eigh`` copy and workspace
    (``syevd``: about ``2 b²``) and the eigenvectors.
    """
    eigs, diag = {}, {}
    for b in plan:
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
            eigs[b.name] = {"QA": parts["A"][0], "eA": parts["A"][1], "QS": parts["S"][0], "eS": parts["S"][1]}
        else:
            diag[b.name] = np.concatenate([sums.pop(f"{b.name}.diag.{i}").ravel()
                                           for i in range(len(b.shapes))]) / n
    return KroneckerFit(plan, False, eigs, {}, diag, regulariser_diagonal(plan, eigs))


def resident_bytes(plan, itemsize):
    """Bytes a compacted fit and its damped eigenvalues hold between test vectors: eigenvectors and
    ``Λ + ρ + λ`` at ``itemsize`` bytes per number (the model's dtype)."""
    total = 0
    for b in plan:
        if isinstance(b, KronBlock):
            total += itemsize * (block_entries(b.a_bounds, b.s_bounds) + b.k1 * b.c_out)
        else:
            total += itemsize * b.size
    return total
