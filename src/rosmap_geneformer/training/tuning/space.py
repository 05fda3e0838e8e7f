"""What a study searches: the search space and the ``params.yaml: tune`` settings.

Every entry is parsed and checked against the ``train`` rules
(:meth:`rosmap_geneformer.training.finetune.Hyperparameters.from_params`) before any data is read
or model trained, so a bad space fails at once with the key and the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from rosmap_geneformer.errors import InputError
from rosmap_geneformer.training import finetune

#: ``train`` keys a study searches; ``tune.space`` must give each a range, choices or a value.
SEARCHABLE: dict[str, type] = {
    "learning_rate": float,
    "warmup_ratio": float,
    "weight_decay": float,
    "lr_scheduler_type": str,
    "epochs": int,
    "batch_size": int,
    "freeze_layers": int,
}
#: ``train`` keys a study takes as they are.
FIXED = (
    "eval_batch_size",
    "class_weights",
    "early_stopping_patience",
    "gradient_accumulation_steps",
)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_distribution(key: str, spec: Any) -> BaseDistribution:
    """One ``tune.space`` entry as an optuna distribution.

    ``{low, high}`` (optional ``log``, ``step``) is a range, ``{choices: [...]}`` a categorical
    and a bare value a fixed choice. Integers for ``epochs``, ``batch_size`` and
    ``freeze_layers``, floats for the rest, strings for ``lr_scheduler_type``.
    """
    where = f"params.yaml: tune.space.{key}"
    kind = SEARCHABLE[key]
    if not isinstance(spec, Mapping):
        spec = {"choices": [spec]}
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        msg = f"{where} has unknown key(s) {unknown}; use low/high (log, step) or choices."
        raise InputError(msg)
    if "choices" in spec:
        if set(spec) != {"choices"}:
            msg = f"{where}: give either choices or low/high, not both."
            raise InputError(msg)
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            msg = f"{where}.choices must be a non-empty list, got {choices!r}."
            raise InputError(msg)
        for value in choices:
            ok = isinstance(value, str) if kind is str else is_number(value)
            if kind is int:
                ok = ok and float(value).is_integer()
            if not ok:
                msg = f"{where}: choice {value!r} is not a {kind.__name__}."
                raise InputError(msg)
        if len(set(choices)) != len(choices):
            msg = f"{where}: choices {choices} repeat a value."
            raise InputError(msg)
        cast = [kind(v) for v in choices]
        return CategoricalDistribution(cast)
    if kind is str:
        msg = f"{where}: a string parameter takes choices: [...], not a range."
        raise InputError(msg)
    missing = [k for k in ("low", "high") if k not in spec]
    if missing:
        msg = f"{where} lacks {missing}; give low and high (or choices)."
        raise InputError(msg)
    low, high = spec["low"], spec["high"]
    log = bool(spec.get("log", False))
    step = spec.get("step")
    for name, value in (("low", low), ("high", high), ("step", step)):
        if value is None and name == "step":
            continue
        if not is_number(value) or (kind is int and not float(value).is_integer()):
            msg = f"{where}.{name}={value!r} is not a {kind.__name__}."
            raise InputError(msg)
    if low > high:
        msg = f"{where}: low {low!r} is above high {high!r}; swap them."
        raise InputError(msg)
    if log and low <= 0:
        msg = f"{where}: log: true needs low > 0 (got {low!r})."
        raise InputError(msg)
    if log and step is not None:
        msg = f"{where}: log and step cannot be combined."
        raise InputError(msg)
    if kind is int:
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1))
    return FloatDistribution(float(low), float(high), log=log, step=step)


def _points(distribution: BaseDistribution) -> list[Any]:
    """The values that bound a distribution (range ends, every choice)."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    return [distribution.low, distribution.high]  # type: ignore[attr-defined]


@dataclass(kw_only=True)
class SearchSpace:
    """The searched fine-tuning hyperparameters (``params.yaml: tune.space``)."""

    distributions: dict[str, BaseDistribution]

    @classmethod
    def from_params(
        cls,
        space: Mapping[str, Any],
        *,
        fixed: Mapping[str, Any],
        n_layers: int | None = None,
    ) -> SearchSpace:
        """Parse and check every entry against the ``train`` rules before any training.

        Parameters
        ----------
        space
            ``params.yaml: tune.space``.
        fixed
            The fixed ``train`` settings (:data:`FIXED` keys); each bound of the space is checked
            together with them by :meth:`Hyperparameters.from_params`.
        n_layers
            Encoder layers of the base model: the most ``freeze_layers`` can freeze.
        """
        if not isinstance(space, Mapping):
            msg = f"params.yaml: tune.space must be a mapping, got {type(space).__name__}."
            raise InputError(msg)
        unknown = sorted(set(space) - set(SEARCHABLE))
        missing = [k for k in SEARCHABLE if k not in space]
        if unknown:
            msg = (
                f"params.yaml: tune.space has unknown key(s) {unknown}; it searches "
                f"{list(SEARCHABLE)} (the other train keys are fixed: {list(FIXED)})."
            )
            raise InputError(msg)
        if missing:
            msg = (
                f"params.yaml: tune.space lacks {missing}; give each a range, choices or a "
                "single value (e.g. freeze_layers: 0)."
            )
            raise InputError(msg)
        distributions = {key: parse_distribution(key, space[key]) for key in SEARCHABLE}
        for key, distribution in distributions.items():
            for value in _points(distribution):
                try:
                    finetune.Hyperparameters.from_params({**fixed, key: value})
                except ValueError as exc:
                    msg = f"params.yaml: tune.space.{key}: {value!r} is not allowed ({exc})"
                    raise InputError(msg) from exc
        if n_layers is not None:
            most = max(_points(distributions["freeze_layers"]))
            if most > n_layers:
                msg = (
                    f"params.yaml: tune.space.freeze_layers reaches {most}, but the base model "
                    f"has {n_layers} encoder layers."
                )
                raise InputError(msg)
        return cls(distributions=distributions)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample (or take the enqueued) values of every searched key for ``trial``."""
        values: dict[str, Any] = {}
        for key, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                values[key] = trial.suggest_categorical(key, dist.choices)
            elif isinstance(dist, IntDistribution):
                values[key] = trial.suggest_int(
                    key, dist.low, dist.high, step=dist.step, log=dist.log
                )
            else:
                assert isinstance(dist, FloatDistribution)
                values[key] = trial.suggest_float(
                    key, dist.low, dist.high, step=dist.step, log=dist.log
                )
        return values

    def check_point(self, point: Mapping[str, Any], *, where: str) -> None:
        """Refuse a fixed point (``tune.enqueue`` entry) with keys or values outside the space."""
        unknown = sorted(set(point) - set(self.distributions))
        if unknown:
            msg = f"{where} has unknown key(s) {unknown}; use keys of tune.space."
            raise InputError(msg)
        for key, value in point.items():
            distribution = self.distributions[key]
            if isinstance(distribution, CategoricalDistribution):
                inside = value in distribution.choices
            else:
                kind = SEARCHABLE[key]
                inside = (
                    is_number(value)
                    and (kind is float or float(value).is_integer())
                    and distribution.low <= value <= distribution.high  # type: ignore[attr-defined]
                )
            if not inside:
                msg = f"{where}.{key}={value!r} is outside tune.space.{key} ({distribution})."
                raise InputError(msg)


@dataclass(kw_only=True)
class TuneSettings:
    """``params.yaml: tune``.

    Parameters
    ----------
    task
        The ``tasks`` key whose val metric the study maximises.
    n_trials
        Trials in the study, shared by the main process and every worker.
    space
        The search space.
    storage
        ``None`` (a journal file under ``paths.checkpoints``), a journal file path, a database
        URL (``postgresql://...``, ``mysql://...``, ``sqlite:///...``) or ``env:VAR`` (the URL
        in an environment variable, so passwords stay out of git).
    study_name
        ``None``: ``<task>-<fingerprint>``, so a study with other params, data or code never mixes
        with this one.
    enqueue
        Points tried first, in order (e.g. the shipped ``train`` values: the baseline); keys not
        given are sampled.
    sampler_startup_trials
        Random trials before TPE models the results.
    pruner
        ``None`` (no pruning) or the median pruner's ``n_startup_trials`` (completed trials
        before pruning starts) and ``n_warmup_steps`` (epochs of a trial before it can be pruned).
    """

    task: str
    n_trials: int
    space: SearchSpace
    storage: str | None = None
    study_name: str | None = None
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    sampler_startup_trials: int = 5
    pruner: dict[str, int] | None = None

    @classmethod
    def from_params(
        cls, tune: Mapping[str, Any], *, fixed: Mapping[str, Any], n_layers: int | None = None
    ) -> TuneSettings:
        """Parse ``params.yaml: tune``; every error names the key and the fix."""
        known = {
            "task",
            "n_trials",
            "storage",
            "study_name",
            "enqueue",
            "sampler",
            "pruner",
            "space",
        }
        unknown = sorted(set(tune) - known)
        if unknown:
            msg = f"params.yaml: tune has unknown key(s) {unknown}; known: {sorted(known)}."
            raise InputError(msg)
        for key in ("task", "n_trials", "space"):
            if key not in tune:
                msg = f"params.yaml: tune.{key} is missing."
                raise InputError(msg)
        n_trials = tune["n_trials"]
        if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
            msg = f"params.yaml: tune.n_trials={n_trials!r} must be a positive integer."
            raise InputError(msg)
        space = SearchSpace.from_params(tune["space"], fixed=fixed, n_layers=n_layers)
        enqueue = list(tune.get("enqueue") or [])
        for i, point in enumerate(enqueue):
            if not isinstance(point, Mapping):
                msg = f"params.yaml: tune.enqueue[{i}] must be a mapping of tune.space keys."
                raise InputError(msg)
            space.check_point(point, where=f"params.yaml: tune.enqueue[{i}]")
        if len(enqueue) > n_trials:
            msg = f"params.yaml: tune.enqueue has {len(enqueue)} points, above tune.n_trials."
            raise InputError(msg)
        sampler = dict(tune.get("sampler") or {})
        if set(sampler) - {"n_startup_trials"}:
            msg = "params.yaml: tune.sampler takes n_startup_trials only."
            raise InputError(msg)
        pruner = tune.get("pruner")
        if pruner is not None:
            pruner = dict(pruner)
            bad = sorted(set(pruner) - {"n_startup_trials", "n_warmup_steps"})
            values = [v for v in pruner.values() if not isinstance(v, int) or v < 0]
            if bad or values:
                msg = (
                    "params.yaml: tune.pruner takes n_startup_trials and n_warmup_steps "
                    "(non-negative integers), or null for no pruning."
                )
                raise InputError(msg)
        return cls(
            task=str(tune["task"]),
            n_trials=n_trials,
            space=space,
            storage=tune.get("storage"),
            study_name=tune.get("study_name"),
            enqueue=[dict(p) for p in enqueue],
            sampler_startup_trials=int(sampler.get("n_startup_trials", 5)),
            pruner=pruner,
        )


def fixed_hyperparameters(train: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`FIXED` keys of ``params.yaml: train`` (defaults where absent)."""
    defaults = finetune.Hyperparameters()
    return {key: train.get(key, getattr(defaults, key)) for key in FIXED}
