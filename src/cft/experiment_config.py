"""The config of ``cft experiment``: a grid (models x methods x seeds) over the stage configs themselves.

The sections ``generate``, ``identify``, ``train``, ``eval`` and ``grpo`` ARE the stage config dataclasses
(``SECTIONS``), holding the values every cell shares (``train_args`` and ``grpo_args``: TRL's own training
arguments of those stages, ``CFTSFTConfig`` / ``CFTGRPOConfig`` fields, kept as values); their YAML keys
are the dataclasses' field names (or an option's alias, ``lr``),
checked and converted as the stage's own command line would (``cft.options``' types and validators).
The fields a cell decides itself (model, input and output paths, method, seed, ...) are not keys: the
runner makes each cell's config as ``dataclasses.replace(section, **cell_fields)``. A stage that adds or
renames an option therefore changes nothing here, only the YAML files that use it.

``SHARED`` experiment fields (dtype, device, benchmarks) are given to every section that has a field of
that name. A mistake is one ``ExperimentError`` line naming the file, line and key (or the override).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cft import options
from cft.cell_defaults import BASELINE
from cft.config import DTYPES, device_option, dtype_option, internal, is_internal, option
from cft.errors import UserError
from cft.selection import METHODS

if TYPE_CHECKING:
    from cft.evaluate import EvalConfig
    from cft.generate import GenerateConfig
    from cft.grpo import GRPORunConfig
    from cft.identify import IdentifyConfig
    from cft.train import TrainConfig


class ExperimentError(UserError, ValueError):
    """A configuration or output folder a person has to fix; the CLI prints it and exits with code 2."""


# section -> (module, stage config class, the fields each cell sets: never YAML keys)
SECTIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    "generate": ("cft.generate", "GenerateConfig", frozenset({"model", "out"})),
    "identify": ("cft.identify", "IdentifyConfig", frozenset({"model", "input", "out", "num_shards", "shard_index"})),
    "train": ("cft.train", "TrainConfig", frozenset({"model", "input", "method", "out", "seed", "resume",
                                                      "reference"})),
    "eval": ("cft.evaluate", "EvalConfig", frozenset({"model", "benchmarks", "out", "seed"})),
    "grpo": ("cft.grpo", "GRPORunConfig", frozenset({"init", "out", "data", "resume"})),
    # TRL's own training arguments of stages C and GRPO (learning_rate, num_train_epochs, ...)
    "train_args": ("cft.train", "CFTSFTConfig", frozenset({"seed"})),
    "grpo_args": ("cft.grpo", "CFTGRPOConfig", frozenset({"seed"})),
}
# Sections kept as their checked values, not as an instance: TRL's TrainingArguments resolve themselves in
# __post_init__ (enums, derived batch sizes, accelerate state), so each cell builds its own from the values.
VALUE_SECTIONS = ("train_args", "grpo_args")
ARGS_HINT = {"train": "; TRL's training arguments (learning_rate, num_train_epochs, ...) go under train_args",
             "grpo": "; TRL's GRPO arguments (learning_rate, max_steps, num_generations, ...) go under grpo_args"}
# Experiment fields given to every section with a field of the same name (so not keys of the sections).
SHARED = ("dtype", "device", "benchmarks")
# Values of required stage fields that a config may leave out: the default grid trains on the testbed.
REQUIRED_DEFAULTS = {"generate": {"data": "testbed:train"}}


@dataclass
class TuneConfig:
    """Per-method hyper-parameter selection before the seeded grid: every combination of ``grid`` (TRL training
    arguments) is trained once with ``seed`` and scored by greedy accuracy on ``benchmark``, a split the results
    never report; each method's grid cells then train at its best setting (ties: the earlier grid point)."""

    grid: dict[str, list[Any]] = option(factory=dict, help="TRL training arguments (train_args keys) and the values "
                                                           "to try; every combination is one run")
    benchmark: str = option("testbed:val", "the selection split (never reported as a result)")
    limit: int = option(200, "greedy problems of the selection split")
    seed: int = option(0, "the training seed of every tuning run")
    methods: list[str] | None = option(None, "the methods tuned (null: every method of the grid not in share)")
    share: dict[str, str] = option(factory=dict, help="methods that take another method's chosen setting, e.g. "
                                                      "{cft_mix: cft} (also for the ablations' methods)")


@dataclass
class CurveConfig:
    """Learning curves: checkpoints at ``points`` evenly spaced fractions of training (the last is the trained
    model), each scored by greedy accuracy and sampled entropy on ``benchmarks``; the starting model is the
    point at fraction 0."""

    points: int = option(3, "evaluated checkpoints per training run (fractions 1/points, 2/points, ..., 1)")
    methods: list[str] | None = option(None, "the methods with curves (null: every method)")
    benchmarks: list[str] = option(factory=lambda: ["testbed:val", "testbed:test"], help="curve benchmarks")
    limit: int = option(200, "greedy problems per benchmark")
    n_samples: int = option(4, "samples per problem for the entropy (0: greedy only)")
    sample_limit: int = option(50, "problems sampled per benchmark")


@dataclass
class ExperimentConfig:
    """The grid and the stage configs its cells share; saved (stage values that differ from the stage defaults)
    as ``OUT/experiment.yaml``."""

    out: str = option(help="output folder of the whole grid")
    models: list[str] = option(factory=lambda: ["testbed"], help="the starting models; stages A and B run once each")
    methods: list[str] = option(factory=lambda: ["sft", "cft"], help="token-selection methods (cft.selection)")
    seeds: list[int] = option(factory=lambda: [0, 1, 2],
                              help="training seeds: data order, the baselines' random choices, evaluation sampling")
    benchmarks: list[str] = option(factory=lambda: ["testbed:test", "testbed:test_ood"],
                                   help="evaluated for every checkpoint")
    baseline: str = option("sft", "paired differences are taken against this method")
    rho1_reference: str | None = option("sft", "rho1's reference: a method of the grid (its checkpoint of the same "
                                               "seed), a model, or null (the starting model)")
    evaluate_base: bool = option(True, "evaluate the starting model once (first seed) as a reference row")
    sample_limit: int | None = option(None, "pass@k, maj@k and entropy on the first N of eval.limit's problems "
                                            "(null: all of them); sampling costs n_samples decodes per problem")
    sample_benchmarks: list[str] | None = option(None, "the benchmarks sampled for pass@k, maj@k and entropy "
                                                       "(null: every benchmark; the others are decoded greedily only)")
    eval_dtype: str | None = option(None, "dtype of every evaluation (null: dtype); e.g. bfloat16 where the "
                                          "hardware runs it natively while stages A and B stay in float32",
                                    choices=list(DTYPES))
    eval_data_seed: int = option(0, "which testbed problems are evaluated (the same for every seed)")
    grpo_from: list[str] = option(factory=list, help="GRPO starts from the checkpoints of these methods ([]: none)")
    grpo_seeds: list[int] | None = option(None, "the seeds GRPO runs for (null: every seed of the grid)")
    evaluate_grpo: bool = option(True, "evaluate the GRPO policies")
    compare: list[str] = option(factory=list, help='paired bootstrap comparisons over problems and seeds, "A vs B" '
                                                   '(methods, or grpo:METHOD); each of accuracy and pass@k')
    bootstrap_resamples: int = option(10_000, "resamples of the paired bootstrap")
    dtype: str = dtype_option("float32")
    device: str | None = device_option()
    generate: GenerateConfig = internal(None)
    identify: IdentifyConfig = internal(None)
    train: TrainConfig = internal(None)
    eval: EvalConfig = internal(None)
    grpo: GRPORunConfig = internal(None)
    train_args: dict[str, Any] = internal(factory=dict)
    grpo_args: dict[str, Any] = internal(factory=dict)
    tune: TuneConfig | None = internal(None)
    curves: CurveConfig | None = internal(None)
    # name -> the sub-experiment (OUT/ablations/NAME): this config with the overrides in ablation_overrides
    ablations: dict[str, ExperimentConfig] = internal(factory=dict)
    ablation_overrides: dict[str, dict[str, Any]] = internal(factory=dict)

    def __post_init__(self) -> None:
        for name in (n for n in SECTIONS if n not in VALUE_SECTIONS):
            section = getattr(self, name)
            setattr(self, name, stage_config(self, name) if section is None else replace(section, **shared(self, name)))

    @property
    def sampled(self) -> int | None:
        """Problems per benchmark of the sampled metrics."""
        return self.eval.limit if self.sample_limit is None else self.sample_limit


def stage_class(section: str) -> type:
    module, name, _ = SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def _settable(cls: type, section: str | None) -> dict[str, dataclasses.Field]:
    """The fields of ``cls`` a config may set: not filled by the code, not decided per cell nor shared."""
    fixed = SECTIONS[section][2] | set(SHARED) if section else set()
    return {f.name: f for f in fields(cls)
            if f.init and (not is_internal(f) or _nested(f)) and f.name not in fixed}


def _nested(f: dataclasses.Field) -> bool:
    """A nested config (GenerateConfig.decode): not a command-line option, but a YAML mapping."""
    return f.default_factory is not MISSING and dataclasses.is_dataclass(f.default_factory)


def shared(cfg: ExperimentConfig, section: str) -> dict[str, Any]:
    names = {f.name for f in fields(stage_class(section))}
    out = {k: getattr(cfg, k) for k in SHARED if k in names}
    if section == "eval" and cfg.eval_dtype:
        out["dtype"] = cfg.eval_dtype
    return out


def stage_config(cfg: ExperimentConfig, section: str, values: dict[str, Any] | None = None):
    """The section's stage config from its (converted) values: shared fields from ``cfg``, and the required
    fields a cell sets left empty until the cell sets them."""
    cls = stage_class(section)
    values = {**REQUIRED_DEFAULTS.get(section, {}), **(values or {}), **shared(cfg, section)}
    for f in fields(cls):
        if f.init and f.default is MISSING and f.default_factory is MISSING and f.name not in values:
            if f.name not in SECTIONS[section][2]:
                raise ExperimentError(f"{section}: {f.name} is required ({cls.__name__})")
            values[f.name] = ""
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise ExperimentError(f"{section}: {exc}") from None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def settings(obj: Any, section: str | None = None) -> dict[str, Any]:
    """What the experiment chose of a stage config, hashed into its cells: the settable fields whose value
    differs from ``cell_defaults.BASELINE`` (nested configs as mappings; a field added later, at its default,
    keeps old runs valid; a changed default changes the hash of the runs that used it). A TRL argument section
    (a mapping) gives its values as given, plus the ``cft`` defaults it left out that no longer match."""
    if isinstance(obj, dict):  # a VALUE_SECTIONS section: only the values the config gave
        cls = stage_class(section) if section else None
        frozen = BASELINE.get(cls.__name__, {}) if cls else {}
        live = {f.name: _default(f) for f in fields(cls)} if cls else {}
        return {**{k: live[k] for k, v in frozen.items() if k not in obj and live.get(k, v) != v}, **obj}
    out = {}
    frozen = BASELINE.get(type(obj).__name__, {})
    for name, f in _settable(type(obj), section).items():
        value, default = getattr(obj, name), frozen.get(name, _default(f))
        if dataclasses.is_dataclass(value):
            nested = settings(value)
            if nested:
                out[name] = nested
        elif value != default:
            out[name] = value
    return out


def config_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as YAML: every experiment field, and each section's non-default values (loadable again)."""
    top = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in SECTIONS and not is_internal(f)}
    out = {**top, **{name: settings(getattr(cfg, name), name) for name in SECTIONS}}
    for name in PLAIN:
        if getattr(cfg, name) is not None:
            out[name] = dataclasses.asdict(getattr(cfg, name))
    if cfg.ablation_overrides:
        out["ablations"] = cfg.ablation_overrides
    return out


# ---------------------------------------------------------------- reading and checking values


Where = Callable[[tuple[str, ...]], str]


def _convert(cls: type, raw: Any, path: tuple[str, ...], where: Where, section: str | None = None,
             localns: dict[str, Any] | None = None) -> dict[str, Any]:
    """``raw`` checked and converted field by field as the command line would (types, choices, validators)."""
    label = ".".join(path) or "the config"
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where(path)}: {label} must be a mapping of {cls.__name__} fields")
    allowed = _settable(cls, section)
    hints = typing.get_type_hints(cls, localns=localns)
    parser = options.Parser(prog="cft experiment", add_help=False)
    nested = {}
    for name, f in allowed.items():
        if dataclasses.is_dataclass(hints[name]):
            nested[name] = hints[name]
            continue
        f.type = hints[name]  # resolved, as HfArgumentParser does
        parser.add_field(f)
    if section:  # stage options get the command line's validators by name (the experiment's own 'out' is checked
        options.harden(parser, "experiment")  # when the folder is made)
    actions = options.option_actions(parser)
    # an option's aliases work as keys too (train_args: {lr: 3e-4} as on the command line: --lr)
    aliases = {o.lstrip("-").replace("-", "_"): a.dest for a in parser._actions for o in a.option_strings}
    out = {}
    for given, value in raw.items():
        key_path = (*path, str(given))
        if not path and (given in SECTIONS or given in PLAIN or given == "ablations"):
            continue
        key = aliases.get(given, given)  # given by its name and an alias: the later wins (an override is later)
        if key not in allowed:
            fixed = section and key in SECTIONS[section][2] | set(SHARED)
            why = ("set by the experiment for each cell" if key not in SHARED else "set at the top level") if fixed \
                else f"not a field of {cls.__name__}{ARGS_HINT.get(section or '', '')}"
            raise ExperimentError(f"{where(key_path)}: {why} (keys: {', '.join(sorted(allowed))})")
        if key in nested:
            values = _convert(nested[key], value, key_path, where)
            out[key] = replace(_default(allowed[key]), **values)
            continue
        try:
            out[key] = None if value is None else options.yaml_value(actions[key][0], value)
        except ValueError as exc:
            raise ExperimentError(f"{where(key_path)}: {exc}") from None
    return out


PLAIN = {"tune": TuneConfig, "curves": CurveConfig}  # optional top-level mappings, checked by _plain


def _plain(cls: type, raw: Any, path: tuple[str, ...], where: Where) -> Any:
    """A ``TuneConfig`` / ``CurveConfig`` from its mapping: known keys, each value of its declared shape."""
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where(path)}: {path[-1]} must be a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        key_path = (*path, str(key))
        if key not in hints:
            raise ExperimentError(f"{where(key_path)}: not a field of {cls.__name__} (keys: {', '.join(hints)})")
        hint = hints[key]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if value is None and type(None) in args:
            values[key] = None
            continue
        if origin in (typing.Union, types.UnionType):
            hint = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(hint), typing.get_args(hint)
        ok = (isinstance(value, dict) if origin is dict else
              isinstance(value, list) and all(isinstance(v, args[0]) for v in value) if origin is list else
              isinstance(value, (int, float)) and not isinstance(value, bool) if hint is float else
              isinstance(value, hint) and not (hint is int and isinstance(value, bool)))
        if not ok:
            raise ExperimentError(f"{where(key_path)}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
        values[key] = value
    return cls(**values)


def _tune(raw: Any, where: Where) -> TuneConfig:
    """The tuning section; every grid value is checked as a ``train_args`` value (TRL's types)."""
    tune = _plain(TuneConfig, raw, ("tune",), where)
    grid = {}
    for key, values in tune.grid.items():
        path = ("tune", "grid", str(key))
        if not isinstance(values, list) or not values:
            raise ExperimentError(f"{where(path)}: a grid entry is a non-empty list of values")
        converted = [_convert(stage_class("train_args"), {key: v}, ("tune", "grid"), where, section="train_args")
                     for v in values]
        name = next(iter(converted[0]))  # an alias (lr) becomes its field (learning_rate)
        grid[name] = [c[name] for c in converted]
    if not grid:
        raise ExperimentError(f"{where(('tune', 'grid'))}: tune needs a grid (e.g. learning_rate: [1e-4, 3e-4])")
    return replace(tune, grid=grid)


def grid_points(tune: TuneConfig) -> list[dict[str, Any]]:
    """Every combination of the grid, the first key varying slowest (the YAML's order)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in tune.grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in, mappings recursively (an ablation changes single keys of a section)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _ablations(raw: dict[str, Any], where: Where) -> tuple[dict[str, ExperimentConfig], dict[str, dict[str, Any]]]:
    """Each ablation: the main config with its overrides, in ``OUT/ablations/NAME``, without the main grid's
    base evaluation, tuning, curves, GRPO and further ablations (unless the overrides set them)."""
    given = raw.get("ablations") or {}
    if not isinstance(given, dict):
        raise ExperimentError(f"{where(('ablations',))}: ablations must map a name to the keys it changes")
    subs, overrides = {}, {}
    inherited = {k: v for k, v in raw.items() if k not in ("ablations", "tune", "curves", "grpo", "grpo_args",
                                                               "grpo_from", "grpo_seeds", "compare")}
    for name, over in given.items():
        path = ("ablations", str(name))
        if not isinstance(over, dict) or not over:
            raise ExperimentError(f"{where(path)}: an ablation maps the keys it changes to their values")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise ExperimentError(f"{where(path)}: an ablation name is a folder name (letters, digits, _ . -)")
        sub = _merge({**inherited, "evaluate_base": False}, over)
        sub["out"] = str(Path(raw["out"]) / "ablations" / str(name))
        subs[str(name)] = build_config(sub, lambda p, path=path: where((*path, *p)))
        overrides[str(name)] = over
    return subs, overrides


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line of every mapping key of a YAML document, by its key path."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                lines[(*path, str(key.value))] = key.start_mark.line + 1
                walk(value, (*path, str(key.value)))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def set_override(raw: dict[str, Any], item: str) -> tuple[str, ...]:
    """Apply ``a.b=value`` (value parsed as YAML) to the raw config mapping; returns the key path."""
    if "=" not in item:
        raise ExperimentError(f"override {item!r} is not key=value")
    key, value = item.split("=", 1)
    node = raw
    *parents, last = key.strip().split(".")
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ExperimentError(f"override {item!r}: {name} is not a mapping")
    node[last] = yaml.safe_load(value)
    return (*parents, last)


def build_config(raw: dict[str, Any], where: Where | None = None) -> ExperimentConfig:
    """Check and convert a raw mapping (YAML plus overrides) into an ``ExperimentConfig``."""

    where = where or (lambda path: f"key {'.'.join(path)!r}")
    classes = {name: stage_class(name) for name in SECTIONS}
    localns = {cls.__name__: cls for cls in classes.values()}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{where(())}: expected a mapping at the top level")
    top = _convert(ExperimentConfig, raw, (), where, localns=localns)
    if not top.get("out"):
        raise ExperimentError(f"{where(())}: the config needs an output folder: out")
    try:
        cfg = ExperimentConfig(**top)
    except (TypeError, ValueError) as exc:
        raise ExperimentError(f"{where(())}: {exc}") from None
    for name in SECTIONS:
        values = _convert(classes[name], raw.get(name), (name,), where, section=name)
        setattr(cfg, name, values if name in VALUE_SECTIONS else stage_config(cfg, name, values))
    if raw.get("tune") is not None:
        cfg.tune = _tune(raw["tune"], where)
    if raw.get("curves") is not None:
        cfg.curves = _plain(CurveConfig, raw["curves"], ("curves",), where)
    cfg.ablations, cfg.ablation_overrides = _ablations(raw, where)
    if ("grpo" in raw or "grpo_args" in raw) and not cfg.grpo_from:
        raise ExperimentError(f"{where(('grpo',))}: GRPO settings without grpo_from (the methods it starts from)")
    check(cfg, METHODS)
    return cfg


def check(cfg: ExperimentConfig, methods: tuple[str, ...]) -> None:
    """The relations between fields that no single field's check sees."""
    for method in cfg.methods:
        if method not in methods:
            raise ExperimentError(f"unknown method {method!r}; choose from {', '.join(methods)}")
    if len(set(cfg.methods)) != len(cfg.methods) or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ExperimentError("methods and seeds must not repeat")
    if not cfg.seeds or not cfg.methods or not cfg.models or not cfg.benchmarks:
        raise ExperimentError("models, methods, seeds and benchmarks must each name at least one entry")
    if cfg.rho1_reference in methods and "rho1" in cfg.methods and cfg.rho1_reference not in cfg.methods:
        raise ExperimentError(f"rho1_reference {cfg.rho1_reference!r} is a method but not in methods")
    if cfg.rho1_reference == "rho1":
        raise ExperimentError("rho1_reference cannot be rho1 itself")
    missing = [m for m in cfg.grpo_from if m not in cfg.methods]
    if missing:
        raise ExperimentError(f"grpo_from names method(s) not in methods: {', '.join(missing)}")
    for item in cfg.compare:
        pair = [m.strip() for m in item.split(" vs ")]
        if len(pair) != 2 or not all(pair):
            raise ExperimentError(f"compare entry {item!r} is not 'A vs B'")
    if cfg.tune:
        unknown = [m for m in [*(cfg.tune.methods or []), *cfg.tune.share.values()] if m not in cfg.methods]
        if unknown:
            raise ExperimentError(f"tune names method(s) not in methods: {', '.join(unknown)}")
        bad = [m for m in cfg.tune.share if m not in methods]
        if bad:
            raise ExperimentError(f"tune.share: unknown method(s) {', '.join(bad)}")
    if cfg.curves and cfg.curves.points < 1:
        raise ExperimentError("curves.points must be at least 1")
    extra = [s for s in cfg.grpo_seeds or [] if s not in cfg.seeds]
    if extra:
        raise ExperimentError(f"grpo_seeds {extra} are not seeds of the grid")
    unsampled = [b for b in cfg.sample_benchmarks or [] if b not in cfg.benchmarks]
    if unsampled:
        raise ExperimentError(f"sample_benchmarks names benchmark(s) not in benchmarks: {', '.join(unsampled)}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config of a YAML file with ``key.sub=value`` overrides; errors name the file and line or the override."""
    text = Path(path).read_text()
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: expected a mapping at the top level")
    lines = _key_lines(text)
    origin: dict[tuple[str, ...], str] = {}
    for item in overrides or []:
        origin[set_override(raw, item)] = f"override {item!r}"

    def where(key_path: tuple[str, ...]) -> str:
        for n in range(len(key_path), 0, -1):  # an override of a.b also explains an error in a.b.c
            if key_path[:n] in origin:
                return origin[key_path[:n]]
        if not key_path:
            return str(path)
        return f"{path}, line {lines.get(key_path, '?')}, key {'.'.join(key_path)!r}"

    return build_config(raw, where)
