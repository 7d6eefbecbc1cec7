"""The linear baseline: brain features -> image embeddings by cross-validated ridge regression.

:class:`RidgeDecoder` is scikit-learn all the way down -- ``StandardScaler`` fitted on the
training data only, then ``RidgeCV`` over a log-spaced alpha grid with multi-output targets,
optionally wrapped in ``TransformedTargetRegressor`` to standardize each target.

Primal or dual form
-------------------
``RidgeCV`` with its default efficient leave-one-out (``cv=None``) and ``gcv_mode="eigen"``
eigendecomposes the ``(n_samples, n_samples)`` Gram matrix ``X Xᵀ`` when
``n_features >= n_samples`` -- the dual / linear-kernel form, exact and identical to
``KernelRidge(kernel="linear")`` but with all alphas of the grid scored from one
decomposition -- and the ``(n_features, n_features)`` covariance ``Xᵀ X`` otherwise. Flattened
MEG epochs (e.g. 272 channels x 180 samples ≈ 49k features for ~2k trials) therefore never
build a 49k x 49k matrix. With grouped k-fold (``groups=`` in :meth:`RidgeDecoder.fit`),
``RidgeCV`` grid-searches ``Ridge(solver="auto")``, whose Cholesky solver also switches to the
kernel form when features outnumber samples. The form used is recorded in ``solver_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import linalg
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import GroupKFold, KFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from neurorecon.models.common.logging import logger

__all__ = ["DEFAULT_ALPHAS", "GramRidge", "RidgeDecoder", "StandardGram", "gram_ridge_predict",
           "gram_ridge_solve"]

#: default regularization grid: 15 values log-spaced from 1e-1 to 1e6
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.logspace(-1, 6, 15))


_EDGE_WARNED: set[tuple] = set()  # alpha-on-the-edge warnings already given


class RidgeDecoder(RegressorMixin, BaseEstimator):
    """Cross-validated ridge regression from brain data to embeddings (the linear baseline).

    Parameters
    ----------
    alphas : sequence of float
        Regularization grid (all > 0). Default: ``np.logspace(-1, 6, 15)``. Features are
        standardized first (``standardize_x``), so the grid does not depend on data units.
    standardize_x : bool
        Z-score every feature with statistics of the training data (``StandardScaler``).
    standardize_y : bool
        Z-score every target dimension for fitting (so each counts equally in the alpha
        selection) and map predictions back to target units.
    alpha_per_target : bool
        Choose one alpha per target dimension (only with leave-one-out, i.e. without groups
        and ``cv=None``). Otherwise one alpha is shared by all targets.
    cv : int | None
        ``None``: efficient leave-one-out over samples (generalized cross-validation).
        An int: number of folds -- ``KFold`` (unshuffled) or, when ``groups`` are passed to
        :meth:`fit`, ``GroupKFold``. Passing groups without ``cv`` uses 5 folds.
    fit_intercept : bool
        Fit an intercept (needed when ``standardize_x=False`` and data are not centred).

    Attributes
    ----------
    alpha_ : float | ndarray
        Selected alpha (an array of one per target with ``alpha_per_target=True``).
    solver_ : str
        ``"dual"`` (Gram / linear-kernel form, ``n_features >= n_samples``) or ``"primal"``.
    input_shape_ : tuple of int
        Per-sample shape of ``X`` at fit, e.g. ``(n_chans, n_times)`` or ``(n_voxels,)``.
    n_features_in_ : int
        Number of features after flattening.
    model_ : sklearn estimator
        The fitted scikit-learn pipeline.

    Notes
    -----
    Deterministic: no random state anywhere (exact solvers, unshuffled folds).
    """

    def __init__(
        self,
        *,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        standardize_x: bool = True,
        standardize_y: bool = False,
        alpha_per_target: bool = False,
        cv: int | None = None,
        fit_intercept: bool = True,
    ):
        self.alphas = alphas
        self.standardize_x = standardize_x
        self.standardize_y = standardize_y
        self.alpha_per_target = alpha_per_target
        self.cv = cv
        self.fit_intercept = fit_intercept

    # ----------------------------------------------------------------- helpers
    def _flatten(self, X: Any, *, fitting: bool) -> np.ndarray:
        X = np.asarray(X)
        if X.dtype == object or not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"X must be a numeric array, got dtype {X.dtype}")
        if X.ndim not in (2, 3):
            raise ValueError(
                "X must have shape (n_samples, n_features), e.g. (n_trials, n_voxels), or "
                f"(n_samples, n_chans, n_times); got {X.ndim}-D shape {X.shape}"
            )
        if X.shape[0] == 0 or 0 in X.shape[1:]:
            raise ValueError(f"X has an empty axis: shape {X.shape}")
        if not fitting and X.shape[1:] != self.input_shape_:
            raise ValueError(
                f"X has per-sample shape {X.shape[1:]} but the decoder was fitted on "
                f"{self.input_shape_}; use data with the same channels/voxels and window"
            )
        flat = X.reshape(X.shape[0], -1)
        if not np.issubdtype(flat.dtype, np.floating):
            flat = flat.astype(np.float64)
        n_bad = int((~np.isfinite(flat)).sum())
        if n_bad:
            raise ValueError(f"X contains {n_bad} non-finite value(s) (NaN/inf)")
        return flat

    def _splits(self, X: np.ndarray, Y: np.ndarray, groups: Any) -> Any:
        if groups is None:
            return None if self.cv is None else list(KFold(n_splits=self.cv).split(X))
        groups = np.asarray(groups)
        if groups.shape != (X.shape[0],):
            raise ValueError(
                f"groups must have shape ({X.shape[0]},) -- one label per sample -- "
                f"got {groups.shape}"
            )
        n_splits = 5 if self.cv is None else self.cv
        n_groups = np.unique(groups).size
        if n_groups < n_splits:
            raise ValueError(
                f"groups has {n_groups} distinct value(s); GroupKFold with n_splits={n_splits} "
                "needs at least that many (pass a smaller cv)"
            )
        return list(GroupKFold(n_splits=n_splits).split(X, Y, groups))

    # ----------------------------------------------------------------- API
    def fit(self, X: Any, Y: Any, *, groups: Any = None) -> RidgeDecoder:
        """Fit scalers and ridge on training data.

        Parameters
        ----------
        X : array, shape (n_samples, n_features) or (n_samples, n_chans, n_times)
            Brain data; 3-D epochs are flattened to ``n_chans * n_times`` features.
        Y : array, shape (n_samples, emb_dim) or (n_samples,)
            Targets (stimulus embeddings).
        groups : array, shape (n_samples,), optional
            Group label per sample (e.g. stimulus id, run or block). When given, alpha is
            chosen by ``GroupKFold`` so that repeats of one stimulus never sit on both sides
            of a split -- leave-one-out over repeated stimuli favours too small an alpha.

        Returns
        -------
        self : RidgeDecoder
        """
        alphas = np.asarray(self.alphas, dtype=float)
        if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas)) or np.any(
            alphas <= 0
        ):
            raise ValueError(f"alphas must be a non-empty 1-D sequence of values > 0, got {alphas}")
        X = np.asarray(X)
        flat = self._flatten(X, fitting=True)
        Y = np.asarray(Y, dtype=float)
        if Y.ndim not in (1, 2) or Y.shape[0] != flat.shape[0]:
            raise ValueError(
                f"Y must have shape (n_samples, emb_dim) with n_samples={flat.shape[0]} "
                f"(rows of X), got {Y.shape}"
            )
        if Y.size == 0 or not np.all(np.isfinite(Y)):
            raise ValueError(f"Y must be non-empty and finite (NaN/inf found or shape {Y.shape})")
        if flat.shape[0] < 3:
            raise ValueError(
                f"need at least 3 samples to cross-validate alpha, got {flat.shape[0]}"
            )
        splits = self._splits(flat, Y, groups)
        if splits is not None and self.alpha_per_target:
            raise ValueError(
                "alpha_per_target=True needs leave-one-out (cv=None and no groups); "
                "scikit-learn's RidgeCV does not support it with k-fold"
            )
        ridge = RidgeCV(
            alphas=alphas,
            fit_intercept=self.fit_intercept,
            cv=splits,
            gcv_mode="eigen" if splits is None else None,
            alpha_per_target=self.alpha_per_target,
        )
        steps = [("scaler", StandardScaler())] if self.standardize_x else []
        pipe = Pipeline([*steps, ("ridge", ridge)])
        model = (
            TransformedTargetRegressor(regressor=pipe, transformer=StandardScaler())
            if self.standardize_y
            else pipe
        )
        model.fit(flat, Y)
        self.model_ = model
        self.input_shape_ = tuple(X.shape[1:])
        self.n_features_in_ = flat.shape[1]
        self.solver_ = "dual" if flat.shape[1] >= flat.shape[0] else "primal"
        fitted = model.regressor_ if self.standardize_y else model
        self.alpha_ = fitted.named_steps["ridge"].alpha_
        edge = np.isin(np.atleast_1d(self.alpha_), [alphas.min(), alphas.max()])
        if edge.any():
            # once per process and edge: a run fits many ridges (windows, subjects, read-outs)
            key = (tuple(np.unique(np.atleast_1d(self.alpha_)[edge]).tolist()), alphas.min(),
                   alphas.max())
            if key not in _EDGE_WARNED:
                _EDGE_WARNED.add(key)
                logger.warning(
                    "RidgeDecoder: selected alpha %s lies on the edge of the grid [%g, %g]; "
                    "consider widening `alphas` (said once)", list(key[0])[:3], alphas.min(),
                    alphas.max())
        logger.debug(  # one line per fit: the callers log one summary per subject
            "RidgeDecoder: %d samples x %d features (%s form), alpha=%s",
            flat.shape[0], flat.shape[1], self.solver_, self.alpha_,
        )
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predict embeddings.

        Parameters
        ----------
        X : array, shape (n_samples, *input_shape_)
            Brain data with the same per-sample shape as at fit.

        Returns
        -------
        Y_pred : ndarray, shape (n_samples, emb_dim)
            Predicted embeddings in target units.
        """
        check_is_fitted(self, "model_")
        return self.model_.predict(self._flatten(X, fitting=False))

    def linear_map(self) -> tuple[np.ndarray, np.ndarray]:
        """The fitted decoder as one affine map: ``predict(X) == X_flat @ weight.T + bias``.

        Scalers of inputs (and targets, with ``standardize_y``) are folded in, so a served
        decoder needs only these two arrays (``weight (n_outputs, n_features)``, ``bias
        (n_outputs,)``), no pickled estimator.
        """
        check_is_fitted(self, "model_")
        pipe = self.model_.regressor_ if self.standardize_y else self.model_
        ridge = pipe.named_steps["ridge"]
        weight = np.atleast_2d(np.asarray(ridge.coef_, np.float64))
        bias = np.atleast_1d(np.asarray(ridge.intercept_, np.float64)) * np.ones(len(weight))
        if self.standardize_x:
            scaler = pipe.named_steps["scaler"]
            weight = weight / scaler.scale_
            bias = bias - weight @ scaler.mean_
        if self.standardize_y:
            out = self.model_.transformer_
            weight = weight * out.scale_[:, None]
            bias = bias * out.scale_ + out.mean_
        return weight.astype(np.float32), bias.astype(np.float32)


#: rows per block wherever a Gram ridge works through rows (bounded temporaries)
ROW_BLOCK = 256


class StandardGram:
    """Linear-kernel (Gram) matrices of standardized features, accumulated over feature chunks.

    The dual form of :class:`RidgeDecoder` (``StandardScaler`` then ``RidgeCV`` with
    leave-one-out) needs only ``K = Z Zᵀ`` over the fit rows and ``K_eval = Z_eval Zᵀ``,
    ``Z`` the features standardized with the fit rows' mean and standard deviation. Both are
    sums over any partition of the features, so a caller can add one chunk of features at a
    time (e.g. a time slice of every trial) and never hold all of them: memory is one chunk
    plus the ``(n_fit, n_fit)`` Gram. Only the Gram's lower triangle is accumulated, a block of
    rows at a time (no ``(n_fit, n_fit)`` temporary); :meth:`folds` mirrors it, and the
    eigendecomposition reads that triangle alone.

    Parameters
    ----------
    n_fit, n_eval : int
        Rows of the fit and evaluation sets.
    """

    def __init__(self, n_fit: int, n_eval: int):
        self.K = np.zeros((n_fit, n_fit))
        self.K_eval = np.zeros((n_eval, n_fit))
        self.n_features = 0
        self.stats: list[tuple[np.ndarray, np.ndarray]] = []  # (mean, scale) of each chunk

    def add(self, fit: np.ndarray, evaluate: np.ndarray) -> None:
        """Add a chunk of features: ``fit (n_fit, n_chunk)``, ``evaluate (n_eval, n_chunk)``.

        Standardized like ``StandardScaler`` (population sd; constant features scaled by 1)
        with statistics of ``fit``; the arrays are modified in place (pass copies to keep
        them)."""
        mean = fit.mean(0, dtype=np.float64)
        for a in (fit, evaluate):
            a -= mean.astype(a.dtype)
        squares = np.zeros(fit.shape[1])
        for start in range(0, len(fit), ROW_BLOCK):  # float64 sums, no float64 copy of fit
            block = fit[start:start + ROW_BLOCK].astype(np.float64)
            squares += np.einsum("ij,ij->j", block, block)
        scale = np.sqrt(squares / len(fit))
        scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)] = 1.0
        for a in (fit, evaluate):
            a /= scale.astype(a.dtype)
        self.stats.append((mean, scale))
        for start in range(0, len(fit), ROW_BLOCK):  # lower triangle + diagonal blocks
            stop = start + ROW_BLOCK
            self.K[start:stop, :stop] += fit[start:stop] @ fit[:stop].T
        for start in range(0, len(evaluate), ROW_BLOCK):
            self.K_eval[start:start + ROW_BLOCK] += evaluate[start:start + ROW_BLOCK] @ fit.T
        self.n_features += fit.shape[1]

    def _mirror(self) -> None:
        """Copy the accumulated lower triangle of ``K`` into its upper triangle."""
        for start in range(0, len(self.K), ROW_BLOCK):
            stop = start + ROW_BLOCK
            self.K[start:stop, stop:] = self.K[stop:, start:stop].T

    def folds(self, fit: np.ndarray, evaluate: np.ndarray) -> StandardGram:
        """The Gram matrices of a fold: ``fit`` and ``evaluate`` index this Gram's fit rows
        (a :class:`StandardGram` built with ``n_eval=0`` over all rows of a cross-validation).

        Features stay standardized with all rows' statistics (no target is involved); the
        linear kernel is re-centred on the fold's fit rows, so the unpenalized intercept of
        :func:`gram_ridge_predict` is that of a ridge fitted on those rows alone."""
        self._mirror()
        out = StandardGram(0, 0)
        out.K = self.K[np.ix_(fit, fit)]  # copies, centred in place
        out.K_eval = self.K[np.ix_(evaluate, fit)]
        col = out.K.mean(0)
        grand = col.mean()
        out.K_eval -= out.K_eval.mean(1, keepdims=True)
        out.K_eval -= col[None, :] - grand
        out.K -= col[None, :]
        out.K -= col[:, None] - grand
        out.n_features = self.n_features
        return out

    def linear_map(self, chunks, solution: GramRidge) -> tuple[np.ndarray, np.ndarray]:
        """The fitted ridge as one affine map on the raw features, ``predict(x) = x @ weight.T
        + bias`` (as :meth:`RidgeDecoder.linear_map`): ``chunks`` yields the fit rows' chunks
        again, unstandardized and in the order they were added; each gives its columns of
        ``weight = Zᵀ dual / scale``, so the features are never held whole here either."""
        weights, bias = [], solution.y_mean.copy()
        for (mean, scale), chunk in zip(self.stats, chunks, strict=True):
            w = np.zeros((chunk.shape[1], solution.dual.shape[1]))  # (n_chunk, n_targets)
            for start in range(0, len(chunk), ROW_BLOCK):  # no float64 copy of the chunk
                z = (chunk[start:start + ROW_BLOCK].astype(np.float64) - mean) / scale
                w += z.T @ solution.dual[start:start + ROW_BLOCK]
            w /= scale[:, None]
            weights.append(w.T)
            bias -= mean @ w
        return (np.concatenate(weights, axis=1).astype(np.float32),
                bias.astype(np.float32))


@dataclass
class GramRidge:
    """A ridge fitted in dual form: ``fitted = y_mean + K @ dual``; ``alpha`` chosen by
    leave-one-out (:func:`gram_ridge_solve`)."""

    dual: np.ndarray
    y_mean: np.ndarray
    alpha: float


def gram_ridge_predict(gram: StandardGram, Y: np.ndarray, *,
                       alphas: Sequence[float] | None = None) -> tuple[np.ndarray, float]:
    """Predictions for ``gram``'s evaluation rows and the alpha of :func:`gram_ridge_solve`
    (computed as ``ȳ + (K_eval Q) diag(1 / (l + a)) Qᵀ (Y - ȳ)``: no ``(n, n_targets)`` dual
    coefficients are formed)."""
    fit = _gram_eigen_fit(gram, Y, alphas)
    return fit.y_mean + (gram.K_eval @ fit.Q) @ fit.scaled(), fit.alpha


def gram_ridge_solve(gram: StandardGram, Y: np.ndarray, *,
                     alphas: Sequence[float] | None = None) -> GramRidge:
    """Ridge on standardized features from their Gram matrices: the dual coefficients and the
    alpha chosen by exact leave-one-out over the fit rows.

    The same model as :class:`RidgeDecoder` with its defaults (intercept unpenalized, one alpha
    for all targets, mean squared LOO error): with ``K = Q diag(l) Qᵀ``, the fitted values are
    ``ȳ + Q diag(l / (l + a)) Qᵀ (Y - ȳ)``, the hat diagonal ``1/n + Σ Q² l / (l + a)`` and the
    LOO residuals ``(y - ŷ) / (1 - h)``.

    The Gram matrix is decomposed in place: ``gram`` cannot be used again for another fit
    (its ``K_eval`` and chunk statistics stay, for predictions and
    :meth:`~StandardGram.linear_map`). ``alphas`` None: :data:`DEFAULT_ALPHAS`.
    """
    fit = _gram_eigen_fit(gram, Y, alphas)
    return GramRidge(dual=fit.Q @ fit.scaled(), y_mean=fit.y_mean, alpha=fit.alpha)


def _loo_errors(Q: np.ndarray, lam: np.ndarray, QtY: np.ndarray,
                alphas: np.ndarray) -> np.ndarray:
    """Summed squared leave-one-out residuals of each alpha: ``(y - ŷ) / (1 - h)`` with
    residuals ``Q diag(a / (l + a)) QᵀYc`` and hat diagonal ``1/n + Σ Q² l / (l + a)``, in
    blocks of rows and target columns (bounded memory). The residual products run in float32
    (half the time of this loop, which dominates a fit's cost; only the argmin is used) and
    sum in float64."""
    n = len(Q)
    shrink = [(a / (lam + a)).astype(np.float32) for a in alphas]
    errors = np.zeros(len(alphas))
    for start in range(0, n, ROW_BLOCK):
        q = Q[start:start + ROW_BLOCK]
        q32 = q.astype(np.float32)
        scale = [(1.0 - (1.0 / n + (q**2) @ (lam / (lam + a))))[:, None].astype(np.float32)
                 for a in alphas]  # 1 - hat of each row, per alpha
        for col in range(0, QtY.shape[1], ROW_BLOCK):
            qty = QtY[:, col:col + ROW_BLOCK].astype(np.float32)
            for i in range(len(alphas)):
                resid = (q32 * shrink[i]) @ qty  # scales the block: no (n, d) temporary
                errors[i] += float(np.square(resid / scale[i], dtype=np.float64).sum())
    return errors


@dataclass
class _EigenFit:
    Q: np.ndarray  # eigenvectors of K
    lam: np.ndarray  # its eigenvalues (clipped at 0)
    QtY: np.ndarray  # Qᵀ (Y - ȳ)
    y_mean: np.ndarray
    alpha: float

    def scaled(self) -> np.ndarray:
        """``diag(1 / (l + a)) Qᵀ (Y - ȳ)``, computed in place (``QtY`` is used up)."""
        self.QtY /= (self.lam + self.alpha)[:, None]
        return self.QtY


def _gram_eigen_fit(gram: StandardGram, Y: np.ndarray,
                    alphas: Sequence[float] | None) -> _EigenFit:
    """The eigendecomposition of :func:`gram_ridge_solve` and its leave-one-out alpha."""
    if gram.K is None:
        raise ValueError("this StandardGram was already used by gram_ridge_predict")
    Y = np.asarray(Y).reshape(len(gram.K), -1)
    alphas = np.asarray(DEFAULT_ALPHAS if alphas is None else alphas, dtype=float)
    if alphas.ndim != 1 or not alphas.size or np.any(alphas <= 0):
        raise ValueError(f"alphas must be a non-empty 1-D sequence of values > 0, got {alphas}")
    n = len(Y)
    if n < 3:
        raise ValueError(f"need at least 3 samples to cross-validate alpha, got {n}")
    y_mean = Y.mean(0, dtype=np.float64)
    # the Gram is not needed afterwards: decomposed in place, from its lower triangle (the one
    # StandardGram.add fills), passed as the upper triangle of its Fortran-ordered transpose:
    # LAPACK then needs no Fortran copy of it (one n x n matrix less at the peak)
    lam, Q = linalg.eigh(gram.K.T, lower=False, overwrite_a=True, check_finite=False)
    gram.K = None
    lam = np.clip(lam, 0.0, None)
    QtY = np.zeros((n, Y.shape[1]))  # Qᵀ (Y - ȳ), in row blocks: no centred float64 copy of Y
    for start in range(0, n, ROW_BLOCK):
        QtY += Q[start:start + ROW_BLOCK].T @ (Y[start:start + ROW_BLOCK] - y_mean)
    alpha = float(alphas[0])
    if len(alphas) > 1:
        alpha = float(alphas[int(np.argmin(_loo_errors(Q, lam, QtY, alphas)))])
    logger.debug("gram ridge: %d samples x %d features, alpha=%g", n, gram.n_features, alpha)
    return _EigenFit(Q=Q, lam=lam, QtY=QtY, y_mean=y_mean, alpha=alpha)
