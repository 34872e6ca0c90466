"""One typed config: every hyperparameter of every strategy, with the reference defaults.

Values come from the dataclass defaults, then a YAML file, then CLI flags (each field is a flag,
its name with dashes). `validate()` turns bad values into one-line `UserError`s that name the
source, the field, the value and what was expected. The resolved config is saved next to a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raysemi.errors import UserError

#: YAML keys accepted as other names of a field (the reference's spelling).
ALIASES = {"DAN_lr": "dan_lr", "T": "uncertainty_passes", "labeled_num": "labeled_patients"}
#: names other training tools use, for the "did you mean" of an unknown key (not accepted as keys)
COMMON_NAMES = {"learning_rate": ["base_lr"], "lr": ["base_lr"], "iterations": ["max_iterations"],
                "max_iter": ["max_iterations"], "max_iters": ["max_iterations"], "epochs": ["max_iterations"],
                "root_path": ["data"], "exp": ["run_name"], "classes": ["num_classes"]}

#: `compile: auto` compiles CUDA runs of at least this many iterations: compiling costs 15-45 s a
#: process (cold cache) and saves 1.5-13 ms a step on an H200 (benchmarks/notes/performance.md)
COMPILE_AUTO_ITERATIONS = 10_000


def _f(default: Any, help: str, group: str = "training") -> Any:
    """A dataclass field with its help text and CLI group (read by `add_config_arguments`)."""
    kw = {"default_factory": lambda: default} if isinstance(default, (list, tuple)) else {"default": default}
    return field(metadata={"help": help, "group": group}, **kw)


def patch_side_ok(side: int) -> bool:
    """The UNet halves a patch four times: a side must be a positive multiple of 16."""
    return side >= 16 and side % 16 == 0


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults are those of the SSL4MIS 2D ACDC scripts."""

    # what and where
    method: str = _f("supervised", "strategy to train (see --list-methods)", "run")
    model: str = _f("auto", "network: 'auto' takes the strategy's own (unet, or unet_ds for pyramid_consistency)", "run")
    data: str = _f("phantom", "dataset root in the SSL4MIS ACDC layout, or 'phantom' for the built-in synthetic set", "run")
    labeled_patients: int = _f(7, "number of training patients whose slices are labeled (taken in list order)", "run")
    num_classes: int = _f(4, "output classes, background included (ACDC: background, RV, Myo, LV)", "run")
    in_channels: int = _f(1, "image channels", "run")
    output: str = _f("", "run folder for config, checkpoints and log (default: runs/<method>-<time>)", "run")
    device: str = _f("auto", "'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'", "run")
    seed: int = _f(1337, "random seed for weights, sampling and augmentation", "run")
    # optimisation
    max_iterations: int = _f(30000, "training iterations (optimizer steps)")
    batch_size: int = _f(24, "slices per batch (labeled + unlabeled)")
    labeled_bs: int = _f(12, "labeled slices per batch; the rest are unlabeled (the supervised baseline ignores it: "
                                 "its batches are batch_size labeled slices, as the reference's fully supervised script)")
    patch_size: tuple[int, int] = _f((256, 256), "training slice size H W (slices are resized to it)")
    base_lr: float = _f(0.01, "SGD learning rate before the poly decay")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "SGD weight decay")
    amp: str = _f("auto", "mixed precision: 'auto' (bf16 on CUDA, off on CPU), 'bf16' or 'off'")
    channels_last: str = _f("auto", "channels_last memory format: 'auto' (on with bf16 on CUDA), 'on' or 'off'")
    cuda_graphs: str = _f("auto", "capture each training iteration once as a CUDA graph and replay it (removes "
                                  "the per-kernel launch cost): 'auto' (on for CUDA), 'on' or 'off'")
    compile: str = _f("auto", "torch.compile the networks: fuses BatchNorm, activation and dropout kernels (on "
                              "an H200 with CUDA graphs, 1.1-1.6x: mean teacher 64 -> 83 it/s, URPC 59 -> 72, DAN "
                              "51 -> 63) for 15-45 s of compiling per process (and some at the first validation), "
                              "less once inductor's on-disk cache has the graphs; 'auto': on for CUDA runs of "
                              f"{COMPILE_AUTO_ITERATIONS:,} iterations or more with CUDA graphs (if compiling fails "
                              "there, one warning and the run goes on uncompiled); 'on' or 'off'")
    # semi-supervised
    consistency: float = _f(0.1, "final weight of the unsupervised term", "strategy")
    consistency_rampup: float = _f(200.0, "ramp length of the consistency weight, in ramp units", "strategy")
    rampup_interval: int = _f(150, "iterations per ramp unit (the reference's iter // 150; with --schedules budget, "
                                   "iterations of the reference's 30,000, scaled to --max-iterations)", "strategy")
    mt_warmup: int = _f(1000, "mean_teacher: iterations before the consistency term starts (reference: 1000; with "
                              "--schedules budget, of the reference's 30,000, scaled)", "strategy")
    schedules: str = _f("reference", "how --rampup-interval and --mt-warmup count: 'reference': in iterations, as "
                                     "the reference; 'budget': as set for the reference's 30,000 iterations, scaled "
                                     "to --max-iterations (a short search and its full-budget retrain then ramp "
                                     "alike; leave both at their defaults then)",
                        "strategy")
    ema_decay: float = _f(0.99, "teacher EMA decay (mean_teacher, uamt, ict)", "strategy")
    uncertainty_threshold_start: float = _f(0.75, "uamt: threshold start, as a fraction of ln 2", "strategy")
    uncertainty_threshold_end: float = _f(1.0, "uamt: threshold end, as a fraction of ln 2", "strategy")
    uncertainty_passes: int = _f(8, "uamt: noisy teacher passes T for the uncertainty map", "strategy")
    uncertainty_copies: int = _f(2, "uamt: noisy copies of the unlabeled batch per teacher forward (the reference: 2); "
                                    "up to T runs the T passes in fewer, larger forwards, which is faster on a GPU; "
                                    "the teacher's BatchNorm batch statistics then span more noisy copies of the "
                                    "same slices: about the same, not the same numbers", "strategy")
    uncertainty_with_target: bool = _f(False, "uamt: run the consistency target's noisy teacher pass in the "
                                              "first uncertainty forward (one teacher forward fewer per step; "
                                              "its BatchNorm batch statistics then span those copies too: about "
                                              "the same, not the same numbers); off: its own forward, as in the "
                                              "reference", "strategy")
    uncertainty_grouped_forward: bool = _f(False, "uamt: run a step's noisy teacher forwards (as uncertainty_copies "
                                                  "and uncertainty_with_target split them) as one batch whose "
                                                  "BatchNorm statistics are taken per forward: the computation of "
                                                  "separate forwards, in fewer, larger kernels (the random draws, noise "
                                                  "and dropout, come in another order)", "strategy")
    ict_alpha: float = _f(0.2, "ict: Beta(alpha, alpha) of the mixing factor", "strategy")
    entropy_classes: int = _f(4, "entropy_minimization: C in the ln(C) normaliser (the 2D reference hard-codes 4)", "strategy")
    dan_lr: float = _f(1e-4, "adversarial: discriminator Adam learning rate (reference DAN_lr)", "strategy")
    # evaluation and reporting
    eval_interval: int = _f(200, "validate every this many iterations", "evaluation")
    eval_batch_size: int = _f(32, "slices per forward pass during validation", "evaluation")
    eval_hd95: bool = _f(True, "compute HD95 at each validation (Dice only when off)", "evaluation")
    eval_model: str = _f("student", "network to validate and keep: 'student' or 'teacher' (EMA)", "evaluation")
    log_interval: int = _f(20, "log training losses every this many iterations", "evaluation")
    tracking_uri: str = _f("", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)", "tracking")
    experiment: str = _f("raysemi", "MLflow experiment name", "tracking")
    run_name: str = _f("", "MLflow run name (default: the run folder's name)", "tracking")
    # testing
    fault_nan_at: int = _f(-1, "testing only: make the loss NaN at this iteration (-1: never)", "testing")

    # ---- derived -------------------------------------------------------------------------
    def compiles(self, device_type: str) -> bool:
        """Whether the networks are compiled on this device type: 'on', or 'auto' on CUDA for runs
        long enough that the compiling pays for itself, inside CUDA graphs (without them the
        compiled step measured slower than the eager one)."""
        return self.compile == "on" or (self.compile == "auto" and device_type == "cuda" and self.cuda_graphs != "off"
                                        and self.max_iterations >= COMPILE_AUTO_ITERATIONS)

    @property
    def unlabeled_bs(self) -> int:
        return self.batch_size - self.labeled_bs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def saved_dict(self) -> dict[str, Any]:
        """`to_dict()` for people to read (saved YAML, MLflow params): the test suite's fault
        switches are left out while they are off, so a user's config holds only real settings."""
        return {k: v for k, v in self.to_dict().items()
                if not (FIELDS[k].metadata["group"] == "testing" and v == FIELDS[k].default)}

    def replace(self, **changes: Any) -> "TrainConfig":
        return from_dict({**self.to_dict(), **changes}, source="overrides")

    def validate(self, source: str | dict[str, str] = "config") -> "TrainConfig":
        """Check every value; raise UserError naming source, field, value and expectation.

        `source` names where the values came from: one string, or a field -> source mapping
        (fields not in it are reported as coming from 'config').
        """
        from raysemi.methods import resolve_method_name
        from raysemi.methods.registry import describe_names
        from raysemi.models import list_models

        def bad(name: str, expected: str) -> None:
            src = source.get(name, "config") if isinstance(source, dict) else source
            where = src if src == "--" + name.replace("_", "-") else f"{src}: {name}"  # the flag names the field
            raise UserError(f"{where}: {getattr(self, name)!r} is invalid; expected {expected}")

        try:
            self.method = resolve_method_name(self.method)
        except KeyError:
            bad("method", f"one of {describe_names()}")
        if self.model != "auto" and self.model not in list_models():
            bad("model", f"'auto' or one of {', '.join(list_models())}")
        if self.num_classes < 2:
            bad("num_classes", "an integer >= 2")
        for name in ("in_channels", "max_iterations", "batch_size", "eval_interval", "eval_batch_size",
                     "log_interval", "rampup_interval", "uncertainty_passes", "uncertainty_copies", "entropy_classes"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1" if name != "uncertainty_passes" else "T >= 1")
        if self.in_channels != 1:
            bad("in_channels", "1 (the data reader reads single-channel slices)")
        if self.entropy_classes < 2:
            bad("entropy_classes", "an integer >= 2")
        if self.labeled_patients < 1:
            bad("labeled_patients", "at least 1 labeled patient")
        if not 1 <= self.labeled_bs < self.batch_size and self.method != "supervised":
            bad("labeled_bs", f"1 <= labeled_bs < batch_size ({self.batch_size}) so that the batch holds unlabeled slices")
        if self.method == "supervised" and self.labeled_bs < 1:
            bad("labeled_bs", "an integer >= 1")
        if len(self.patch_size) != 2 or not all(patch_side_ok(p) for p in self.patch_size):
            bad("patch_size", "two multiples of 16 (the UNet halves the size four times), e.g. 256 256")
        for name in ("base_lr", "dan_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                bad(name, "a finite number > 0")
        for name in ("weight_decay", "consistency", "consistency_rampup", "mt_warmup"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                bad(name, "a finite number >= 0")
        if not 0 <= self.momentum < 1:
            bad("momentum", "a number in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "a number in [0, 1)")
        if not (math.isfinite(self.ict_alpha) and self.ict_alpha > 0):
            bad("ict_alpha", "a number > 0 (Beta(alpha, alpha))")
        for name in ("uncertainty_threshold_start", "uncertainty_threshold_end"):
            if not 0 <= getattr(self, name) <= 2:
                bad(name, "a fraction of ln 2 in [0, 2]")
        if self.amp not in ("auto", "bf16", "off"):
            bad("amp", "'auto', 'bf16' or 'off'")
        if self.channels_last not in ("auto", "on", "off"):
            bad("channels_last", "'auto', 'on' or 'off'")
        if self.compile not in ("auto", "on", "off"):
            bad("compile", "'auto', 'on' or 'off'")
        if self.cuda_graphs not in ("auto", "on", "off"):
            bad("cuda_graphs", "'auto', 'on' or 'off'")
        if self.schedules not in ("reference", "budget"):
            bad("schedules", "'reference' or 'budget'")
        if self.eval_model not in ("student", "teacher"):
            bad("eval_model", "'student' or 'teacher'")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: fields that say where a run is written and logged, not what it trains: a resume that leaves
#: them out goes on in the run's own folder and store (no `resumed/` tag, the run's config.yaml
#: keeps them as first saved)
WHERE_FIELDS = ("output", "run_name", "tracking_uri")


def _field_type(name: str) -> Any:
    return typing.get_type_hints(TrainConfig)[name]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a raw (YAML or CLI) value against the field's type; ints are accepted for floats."""
    typ = _field_type(name)

    def wrong(expected: str) -> UserError:
        # as the YAML file spells it: true, null
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
        return UserError(f"{source}: {name}: {shown} has the wrong type; expected {expected}")

    if typ in (int, float) and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-3 and 1e4 as strings: a number written so is still a number
        try:
            number = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(number) and value.strip().lower() not in ("nan", "inf", "-inf", "infinity"):
                value = number
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise wrong("an integer")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise wrong("a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise wrong("a string" + (" (in quotes, as YAML reads this as a number)"
                                  if isinstance(value, (int, float)) and not isinstance(value, bool) else ""))
    # tuple[int, int]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    raise wrong("two integers, e.g. [256, 256]")


def from_dict(values: dict[str, Any], source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """Build a TrainConfig from a mapping; unknown keys and wrong types are UserErrors."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping of config fields, got {type(values).__name__}")
    kwargs = base.to_dict() if base is not None else {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            close = COMMON_NAMES.get(str(key).lower()) or difflib.get_close_matches(str(key), list(FIELDS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UserError(f"{source}: {key}: unknown config key{hint}; expected one of the config fields, the "
                            "long flags of `python -m raysemi.train --help` written with _ for -")
        kwargs[name] = _coerce(name, value, source)
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return TrainConfig(**kwargs)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers in exponent form without a dot (`1e-4`, `3e4`) as
    floats, as YAML 1.2 does; YAML 1.1 (PyYAML) reads them as strings, so a learning-rate range
    written the usual way would be refused. For search spaces, whose values are numbers; configs
    keep the safe loader (a `run_name: 1e5` stays text) and `_coerce` reads '1e-4' in a number
    field as the number."""


#: numbers in exponent form, which YAML 1.2 reads as floats and YAML 1.1 (PyYAML) as text
EXPONENT_NUMBER = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_NUMBER, list("-+0123456789"))


class YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting text that a YAML 1.2 reader would take for a number
    (`run_name: '1.0e5'`); PyYAML writes it bare, since YAML 1.1 reads it as text."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "'" if EXPONENT_NUMBER.match(text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


YamlDumper.add_representer(str, _represent_text)


def read_yaml(path: str | Path, what: str = "config file", loader: type = yaml.SafeLoader) -> Any:
    """Parse a YAML file (empty -> {}); a missing file or bad YAML is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} " + ("is a folder; expected a YAML file" if path.is_dir() else "not found"))
    try:
        return yaml.load(path.read_text(), Loader=loader) or {}  # noqa: S506 - SafeLoader or a subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)  # where the parser gave up (0-based)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{path}: not valid YAML at {where}{problem}" if where else
                        f"{path}: not valid YAML ({problem})") from None


def load_yaml(path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML config file (a mapping of fields); errors name the file."""
    return from_dict(read_yaml(path), source=str(path), base=base)


def save_yaml(config: TrainConfig, path: str | Path) -> Path:
    """Write the resolved config; `load_yaml` reads it back unchanged."""
    from raysemi.files import write_text_atomic

    return write_text_atomic(path, yaml.dump(config.saved_dict(), Dumper=YamlDumper, sort_keys=False))


def add_config_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per config field (`--batch-size`, `--ema-decay`, ...), default 'not given'."""
    groups: dict[str, Any] = {}
    defaults = TrainConfig()
    for name, f in FIELDS.items():
        if name in skip:
            continue
        group_name = f.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"config: {group_name}")
        group = groups[group_name]
        typ = _field_type(name)
        flags = ["--" + name.replace("_", "-")]
        flags += ["--" + a.replace("_", "-") for a, n in ALIASES.items() if n == name and len(a) > 1]
        own = f.metadata["help"]  # a help that names its default itself keeps its words
        help_text = own if "(default" in own else f"{own} (default: {getattr(defaults, name)!r})"
        if group_name == "testing":  # fault injection for the test suite: works, but not shown in --help
            help_text = argparse.SUPPRESS
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if typ is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typ in (int, float, str):
            group.add_argument(*flags, type=typ, metavar=name.upper() if typ is not str else "TEXT", **kw)
        else:
            group.add_argument(*flags, type=int, nargs=2, metavar=("H", "W"), **kw)


def resolve_with_sources(args: argparse.Namespace, config_file: str | None, exclude: tuple[str, ...] = (),
                         extra: dict[str, Any] | None = None, base: tuple[dict[str, Any], str] | None = None
                         ) -> tuple[TrainConfig, dict[str, str]]:
    """Defaults < YAML file < CLI flags (those in `exclude` left out) < `extra` flag values; not yet
    validated. Also returns field -> where its value came from, for error messages.

    `base` = (values, source name) takes the YAML file's place when the values come from elsewhere
    (an MLflow run, for `raysemi.train --from-run`)."""
    sources: dict[str, str] = {}
    config = TrainConfig()
    if base is not None:
        values, name = base
        config = from_dict(values, source=name)
        sources.update({ALIASES.get(k, k): name for k in values})
    elif config_file:
        raw = read_yaml(config_file)
        config = from_dict(raw, source=str(config_file))
        sources.update({ALIASES.get(k, k): str(config_file) for k in raw})
    overrides = {k: v for k, v in vars(args).items() if k in FIELDS and k not in exclude}
    overrides.update(extra or {})
    if overrides:
        config = from_dict(overrides, source="command line", base=config)
        sources.update({k: "--" + k.replace("_", "-") for k in overrides})
    return absolute_data(config), sources


def absolute_data(config: TrainConfig) -> TrainConfig:
    """`data` as an absolute path (taken, as typed, from the current folder), so that the config a
    run saves (config.yaml, best_config.yaml, a search's state) reads the same data from any
    folder; 'phantom' stays as it is. A moved dataset is given again with `--data`."""
    data = config.data
    if data in ("", "phantom") or not isinstance(data, str):
        return config
    absolute = os.path.abspath(os.path.expanduser(data))
    return config if absolute == data else dataclasses.replace(config, data=absolute)


def resolve(args: argparse.Namespace, config_file: str | None,
            base: tuple[dict[str, Any], str] | None = None) -> TrainConfig:
    """Defaults < YAML file (or `base` values) < CLI flags; validated."""
    config, sources = resolve_with_sources(args, config_file, base=base)
    return config.validate(source=sources)
