"""Search spaces: YAML files of `config field -> distribution`, turned into an Optuna
define-by-run space where the strategy (when several are searched) is a parameter and each
strategy's own parameters are conditional on it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from raysemi.config import FIELDS, _field_type
from raysemi.errors import UserError

TYPES = ("uniform", "loguniform", "int", "choice")
#: fields a search may sample: hyperparameters of training, not data, model shape or evaluation
SEARCHABLE = ("base_lr", "momentum", "weight_decay", "batch_size", "labeled_bs", "consistency", "consistency_rampup",
              "rampup_interval", "mt_warmup", "ema_decay", "uncertainty_threshold_start", "uncertainty_threshold_end",
              "uncertainty_passes", "ict_alpha", "entropy_classes", "dan_lr", "fault_nan_at")


@dataclass(frozen=True)
class Dist:
    """One parameter's distribution."""

    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: tuple | None = None

    def suggest(self, trial: Any, name: str) -> Any:
        if self.type == "uniform":
            return trial.suggest_float(name, self.low, self.high, step=self.step)
        if self.type == "loguniform":
            return trial.suggest_float(name, self.low, self.high, log=True)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_categorical(name, list(self.values))

    def distribution(self):
        """The Optuna distribution that `suggest` draws from."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "uniform":
            return FloatDistribution(self.low, self.high, step=self.step)
        if self.type == "loguniform":
            return FloatDistribution(self.low, self.high, log=True)
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return CategoricalDistribution(list(self.values))

    def lowest(self) -> float:
        """The smallest value a numeric field's distribution can draw (choices may be written as
        text that reads as a number, '1e3', as the config reads them)."""
        return self.low if self.type in ("uniform", "loguniform", "int") else min(float(v) for v in self.values)

    def highest(self) -> float:
        """The largest value a numeric field's distribution can draw (as `lowest`)."""
        return self.high if self.type in ("uniform", "loguniform", "int") else max(float(v) for v in self.values)

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this distribution can draw, as Optuna decides it. Optuna refuses
        to start a trial at a categorical value outside the choices, and only warns at a number
        outside the range or off the step grid (and uses it): such a value is not started at
        either. A bool is not a number here (Optuna would take True for the choice 1)."""
        if isinstance(value, bool) and not any(isinstance(v, bool) for v in self.values or ()):
            return False
        dist = self.distribution()
        try:
            return bool(dist._contains(dist.to_internal_repr(value)))
        except (ValueError, TypeError):  # not among the choices, or not a number
            return False

    def describe(self) -> str:
        """'uniform 20..400', 'choice of 0.9, 0.99': how the space says it in a message."""
        if self.type == "choice":
            return "choice of " + ", ".join(map(str, self.values))
        return f"{self.type} {self.low:g}..{self.high:g}" + (f" in steps of {self.step:g}" if self.step else "")


def parse_dist(source: str, name: str, spec: Any) -> Dist:
    """Check one entry; errors name the file, the field and what was expected."""
    where = f"{source}: {name}"
    if name not in FIELDS:
        raise UserError(f"{where}: not a config field; expected TrainConfig fields such as consistency, ema_decay, base_lr")
    if name not in SEARCHABLE:
        raise UserError(f"{where}: cannot be searched (the data, model shape and evaluation are fixed per search); "
                        f"expected one of {', '.join(f for f in SEARCHABLE if FIELDS[f].metadata['group'] != 'testing')}")
    if not isinstance(spec, dict) or spec.get("type") not in TYPES:
        raise UserError(f"{where}: {spec!r} is not a distribution; expected {{type: {'|'.join(TYPES)}, ...}}")
    kind = spec["type"]
    unknown = set(spec) - {"type", "low", "high", "step", "log", "values"}
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; expected type, low, high, step, log or values")
    if kind == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: values: {values!r}; expected a non-empty list")
        for v in values:
            _check_value(source, name, v)
        return Dist("choice", values=tuple(values))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (low, high)) \
            or not low < high:
        raise UserError(f"{where}: low/high: {low!r}/{high!r}; expected two numbers with low < high")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: low: {low!r}; expected > 0 for a loguniform distribution")
    typ = _field_type(name)
    if kind == "int" and typ is not int:
        raise UserError(f"{where}: type: int, but {name} is a {typ.__name__}; expected uniform or loguniform")
    if kind in ("uniform", "loguniform") and typ is not float:
        raise UserError(f"{where}: type: {kind}, but {name} is a {getattr(typ, '__name__', typ)}; expected int or choice")
    step, log = spec.get("step"), spec.get("log", False)
    if not isinstance(log, bool) or (log and kind != "int"):
        raise UserError(f"{where}: log: {log!r}; expected true or false, and only with type: int (loguniform is the "
                        "float one)")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise UserError(f"{where}: low/high: {low!r}/{high!r}; expected whole numbers for type: int")
    if step is not None:
        if kind == "loguniform" or log:
            raise UserError(f"{where}: step: {step!r}; a log scale takes no step (expected no step, or type: uniform)")
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0 \
                or (kind == "int" and not float(step).is_integer()):
            raise UserError(f"{where}: step: {step!r}; expected a {'whole ' if kind == 'int' else ''}number > 0")
    for v in (low, high):
        _check_value(source, name, int(v) if kind == "int" else float(v))
    return Dist(kind, float(low), float(high), step, log)


def _check_value(source: str, name: str, value: Any) -> None:
    """A bound or choice must itself be a valid value of the field (else every such trial fails)."""
    from raysemi.config import TrainConfig, _coerce

    value = _coerce(name, value, f"{source}: {name}")
    if name in ("batch_size", "labeled_bs", "fault_nan_at"):
        return  # checked together with the rest of the config, per trial
    TrainConfig(method="mean_teacher", **{name: value}).validate(source=source)


def load_space(path: str | Path) -> dict[str, Dist]:
    from raysemi.config import YamlLoader, read_yaml

    path = Path(path)
    raw = read_yaml(path, "search space file", YamlLoader)  # low: 1e-4 is a number
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config field -> distribution")
    return {name: parse_dist(str(path), name, spec) for name, spec in raw.items()}


def shipped_space_path(method: str) -> Path:
    return Path(str(resources.files("raysemi.search_spaces").joinpath(f"{method}.yaml")))


def folder_spaces(folder: Path, methods: list[str]) -> dict[str, Path]:
    """The strategies' files in a `--search-space` folder, named for a strategy or an alias
    (`mean_teacher.yaml`, `mt.yaml`). A YAML file that names no strategy, two files for one, or a
    folder with none for any searched strategy is refused: each would search the shipped spaces
    while the user believes theirs is used. Other files (a README) are left alone."""
    from raysemi.methods import resolve_method_name
    from raysemi.methods.registry import describe_names

    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".yaml", ".yml")
                       and not p.name.startswith(".")):  # hidden: an editor's or macOS's ._mt.yaml
        try:
            method = resolve_method_name(path.stem)
        except KeyError:
            raise UserError(f"--search-space: {path}: '{path.stem}' names no strategy; expected <strategy>.yaml, "
                            f"<strategy> one of: {describe_names()}") from None
        if method in found:
            raise UserError(f"--search-space: {found[method]} and {path} are both {method}'s space; expected one "
                            "file per strategy")
        found[method] = path
    if not any(m in found for m in methods):
        have = ", ".join(p.name for p in found.values()) or "no .yaml files"
        raise UserError(f"--search-space: {folder}: no space for {' or '.join(methods)} (found: {have}); expected "
                        f"{methods[0]}.yaml (a strategy without its file there keeps the shipped space)")
    return found


def space_paths(methods: list[str], override: str | None = None, exact_names: bool = False) -> dict[str, Path]:
    """Each strategy's space file: the shipped one, or `override` (a file for one strategy, or a
    folder of `<strategy>.yaml`, see `folder_spaces`; a strategy without its file keeps the shipped).
    `exact_names`: the rule of searches started before aliases and refusals (a folder's
    `<strategy>.yaml` only, nothing refused), for continuing one of them as it started."""
    from raysemi.methods import resolve_method_name

    if override and Path(override).is_dir():
        if exact_names:
            found = {m: Path(override) / f"{m}.yaml" for m in methods if (Path(override) / f"{m}.yaml").is_file()}
        else:
            found = folder_spaces(Path(override), methods)
        return {m: found.get(m, shipped_space_path(m)) for m in methods}
    if override:
        if len(methods) > 1:
            raise UserError(f"--search-space: {override} is one file but {len(methods)} strategies are searched; "
                            "expected a folder of <strategy>.yaml files")
        try:
            named = resolve_method_name(Path(override).stem)
        except KeyError:
            named = None  # any other name (my_space.yaml) is the searched strategy's
        if named not in (None, methods[0]) and not exact_names:
            raise UserError(f"--search-space: {override} is named for {named} but {methods[0]} is searched; expected "
                            f"{methods[0]}'s space (a file named for it, or any name that is no strategy's)")
        return {methods[0]: Path(override)}
    return {m: shipped_space_path(m) for m in methods}


def load_spaces(methods: list[str], override: str | None = None,
                exact_names: bool = False) -> dict[str, dict[str, Dist]]:
    """Each strategy's space, from `space_paths`."""
    return {m: load_space(path) for m, path in space_paths(methods, override, exact_names).items()}


def spaces_to_json(spaces: dict[str, dict[str, Dist]]) -> dict[str, dict[str, dict[str, Any]]]:
    """The spaces as saved with a search at its start, so that a continued search reads the spaces
    it searched, not files that may have changed since."""
    return {m: {name: asdict(d) for name, d in space.items()} for m, space in spaces.items()}


def spaces_from_json(data: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Dist]]:
    return {m: {name: Dist(**{**d, "values": None if d.get("values") is None else tuple(d["values"])})
                for name, d in space.items()} for m, space in data.items()}


def continued_spaces(saved: dict[str, Any], methods: list[str]) -> dict[str, dict[str, Dist]]:
    """The spaces of a search being continued: those it saved at its start, or (a search started by
    an older version, which saved only the --search-space path) its files read by the rule it
    started with."""
    if saved.get("spaces"):
        return spaces_from_json(saved["spaces"])
    return load_spaces(methods, saved.get("search_space"), exact_names=True)


def describe_sources(methods: list[str], override: str) -> str:
    """'search spaces: mean_teacher from my/mt.yaml; supervised shipped': where each came from,
    said when `--search-space` is given."""
    paths = space_paths(methods, override)
    parts = [f"{m} shipped" if path == shipped_space_path(m) else f"{m} from {path}" for m, path in paths.items()]
    return f"search space{'s' if len(parts) > 1 else ''}: {'; '.join(parts)}"


class DefineByRun:
    """An Optuna define-by-run space: `method` first (when several), then its own parameters,
    named `<method>/<field>` so every strategy's parameters are distinct (conditional) in TPE.
    A class rather than a closure so that Tune can pickle the searcher's state for `--resume`."""

    def __init__(self, spaces: dict[str, dict[str, Dist]]) -> None:
        self.spaces = spaces

    def __call__(self, trial) -> dict[str, Any]:
        methods = list(self.spaces)
        method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
        for name, dist in self.spaces[method].items():
            dist.suggest(trial, f"{method}/{name}")
        return {} if len(methods) > 1 else {"method": method}


def base_points(spaces: dict[str, dict[str, Dist]], base: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """`--start-at-defaults`: one starting point per strategy, in `DefineByRun`'s names, holding the
    base config's value of each searched field, for Optuna to run first. A base value the space
    cannot draw is left out of its point (that field is sampled as usual); the second list says
    which, one line each."""
    points, left_out = [], []
    for method, space in spaces.items():
        point: dict[str, Any] = {"method": method} if len(spaces) > 1 else {}
        for name, dist in space.items():
            if dist.contains(base[name]):
                point[f"{method}/{name}"] = base[name]
            else:
                left_out.append(f"{method}'s base {name} {base[name]!r} lies outside its search space "
                                f"({dist.describe()}): sampled instead")
        points.append(point)
    return points, left_out


def at_base_config(values: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether a trial's searched values are all the base config's: a --start-at-defaults trial
    (or a draw that hit them), the baseline the search has to beat."""
    return bool(values) and all(base.get(k) == v for k, v in values.items())


def define_by_run(spaces: dict[str, dict[str, Dist]]) -> DefineByRun:
    return DefineByRun(spaces)


def trial_values(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(method, {field: value}) from a Tune trial config produced by `define_by_run` (Ray nests
    the `<method>/<field>` names into `{method: {field: value}}`)."""
    method = config["method"]
    values = {}
    nested = config.get(method)
    if isinstance(nested, dict):
        values.update(nested)
    for key, v in config.items():  # flat form, in case the names were not nested
        if isinstance(key, str) and key.startswith(method + "/"):
            values[key.split("/", 1)[1]] = v
    return method, values
