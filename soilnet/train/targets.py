"""Targets: their valid range, the transform a model learns them in, and the back-transform's bias correction.

Nothing is clipped in silence: a target above ``target.max_value`` is an error or, with
``target.out_of_range: drop``, left out and listed (:func:`check_range`). The transforms (:class:`TargetTransform`)
are shared by the network and the random-forest baseline, so both learn the same target.

**Smearing (Duan 1983).** A model of ``t = log1p(y)`` estimates the conditional mean of ``t``; ``expm1`` of it is
the conditional *median* of ``y``, which is biased low for the mean when the residuals ``e`` in log space are
spread out (by ``exp(σ²/2)`` for normal ``e``). Since ``1 + y = exp(t̂ + e)``,
``E[1 + y | x] = exp(t̂) · E[exp(e)]``, and Duan's estimator replaces ``E[exp(e)]`` by the mean of ``exp`` of the
training residuals, without assuming their distribution: ``ŷ = (1 + expm1(t̂)) · S − 1`` with
``S = mean(exp(t_i − t̂_i))``. The ``− 1`` is what ``log1p`` adds over ``log``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from soilnet.config.finetune import TargetConfig


class TargetRangeError(ValueError):
    """Targets above ``target.max_value`` while ``target.out_of_range`` is ``error``."""


def check_range(cfg: TargetConfig, y: np.ndarray, ids: np.ndarray, where: str) -> tuple[np.ndarray, list[dict]]:
    """The points to keep ``(N,)`` bool and the dropped ones ``[{"id", "value"}]`` (target units).

    Only with ``cfg.max_value`` set; a target equal to it is in range. With ``out_of_range: error`` any target
    above it raises :class:`TargetRangeError` naming the count, the largest value and its sample.
    """
    y = np.asarray(y, dtype=np.float64)
    if cfg.max_value is None:
        return np.ones(len(y), dtype=bool), []
    above = y > cfg.max_value
    if not above.any():
        return ~above, []
    if cfg.out_of_range == "error":
        worst = int(np.argmax(np.where(above, y, -np.inf)))
        raise TargetRangeError(
            f"{where}: {int(above.sum())} of {len(y)} targets exceed target.max_value={cfg.max_value:g} "
            f"(largest {y[worst]:g} at sample '{ids[worst]}'); transform={cfg.transform} would "
            f"{'clip them' if cfg.transform == 'scale' else 'train on them'} unnoticed. Raise target.max_value, "
            "use target.transform=log1p without max_value, or set target.out_of_range=drop to leave them out "
            "(they are listed in report.md and metrics.json)"
        )
    dropped = [{"id": str(ids[i]), "value": float(y[i])} for i in np.flatnonzero(above)]
    return ~above, dropped


def smearing_factor(residuals: np.ndarray) -> float:
    """Duan's ``mean(exp(e))`` of residuals ``e = t − t̂`` ``(N,)`` in ``log1p`` space (1.0 for none)."""
    e = np.asarray(residuals, dtype=np.float64)
    e = e[np.isfinite(e)]
    return float(np.mean(np.exp(e))) if e.size else 1.0


@dataclass
class TargetTransform:
    """Maps targets in original units to the training scale and back.

    ``kind``: ``scale`` is the seed's ``y / max_value`` (targets above ``max_value`` never get here, see
    :func:`check_range`; the inverse clips predictions to ``[0, max_value]``); ``log1p``; ``none``. Then, unless
    the loss is RMSLE (which needs non-negative targets), the result is standardised with the training fold's
    mean and std (``center``/``spread``) so that every transform starts from a well-scaled regression problem;
    this changes the loss scale, not its minimiser. ``smearing``: Duan's factor for the ``log1p``
    back-transform (1.0 = no correction).
    """

    kind: str
    max_value: float | None = None
    center: float = 0.0
    spread: float = 1.0
    smearing: float = 1.0

    @classmethod
    def fit(cls, cfg: TargetConfig, y_train: np.ndarray, standardize: bool = True) -> TargetTransform:
        base = cls(cfg.transform, cfg.max_value)
        if not standardize:
            return base
        t = base._base(y_train)
        return cls(cfg.transform, cfg.max_value, float(np.mean(t)), float(np.std(t)) or 1.0)

    def _base(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if self.kind == "scale":
            return np.clip(y / self.max_value, 0.0, 1.0)
        if self.kind == "log1p":
            return np.log1p(y)
        return y

    def forward(self, y: np.ndarray) -> np.ndarray:
        """Targets ``(N,)`` in original units -> the training scale."""
        return (self._base(y) - self.center) / self.spread

    def inverse(self, t: np.ndarray, corrected: bool = True) -> np.ndarray:
        """Training scale ``(N,)`` -> original units; ``corrected=False`` leaves out the smearing factor."""
        t = np.asarray(t, dtype=np.float64) * self.spread + self.center
        if self.kind == "scale":
            assert self.max_value is not None, "the scale transform needs target.max_value"
            return np.clip(t, 0.0, 1.0) * self.max_value
        if self.kind == "log1p":
            y = np.expm1(np.clip(t, 0.0, 50.0))
            return (1.0 + y) * self.smearing - 1.0 if corrected else y
        return t

    def with_smearing(self, scaled_pred: np.ndarray, y: np.ndarray) -> TargetTransform:
        """This transform with Duan's factor from predictions on the training scale and targets ``(N,)``."""
        if self.kind != "log1p":
            raise ValueError(f"smearing corrects the log1p back-transform, not {self.kind}")
        t_hat = np.asarray(scaled_pred, dtype=np.float64) * self.spread + self.center
        s = smearing_factor(np.log1p(np.asarray(y, dtype=np.float64)) - t_hat)
        return TargetTransform(self.kind, self.max_value, self.center, self.spread, s)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "max_value": self.max_value,
            "center": self.center,
            "spread": self.spread,
            "smearing": self.smearing,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TargetTransform:
        """Inverse of :meth:`to_dict`; models saved before smearing existed get 1.0."""
        return cls(d["kind"], d.get("max_value"), d["center"], d["spread"], float(d.get("smearing", 1.0)))
