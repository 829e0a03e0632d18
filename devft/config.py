"""The run configuration: one validated dataclass per section, filled from TOML, Flower's run config or the CLI.

Every knob is a dataclass field with a default and a one-line ``help``; a bad value raises ``ValueError``
naming the field and the value. Keys are ``section.field`` (``lora.r``, ``data.alpha``); dashes and
underscores are interchangeable, so Flower's kebab-case run-config keys work as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devft.aggregation import RULES
from devft.aggregation.norm_bound import check_bound_settings
from devft.aggregation.packed import WIRE_FORMATS
from devft.data.settings import DataSettings
from devft.growth.settings import GrowthSettings
from devft.models.lora import LoraSettings
from devft.training.settings import EvalSettings, TrainSettings

METHODS = ("devft", "fedit", "progfed")
WIRE_DTYPES = ("float32", "float16")
FAULT_MODES = ("raise", "nan", "huge", "shape", "keys", "no-examples")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSettings:
    """Which base model every client fine-tunes."""

    name: str = field(
        default="smollm2-135m",
        metadata={"help": "smollm2-135m (embedded default), tiny-llama|tiny-qwen2|tiny-mistral|tiny-gpt2, a local path or a hub id."},
    )
    dtype: str = field(default="float32", metadata={"help": "Base-weight dtype: float32, bfloat16 or float16."})

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model.name must not be empty")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got dtype={self.dtype!r}")


@dataclass
class FederationSettings:
    """The federated run: method, rounds, sampling, fault tolerance and evaluation cadence."""

    method: str = field(default="devft", metadata={"help": "devft (growing submodels), fedit (full model) or progfed."})
    aggregation: str = field(default="fedit", metadata={"help": "LoRA aggregation rule: fedit, ffa, fedsa, flora, fedex, svd."})
    num_rounds: int = field(default=12, metadata={"help": "Total federated rounds over all stages (>= 1)."})
    clients_per_round: int = field(default=4, metadata={"help": "Clients sampled each round (>= 1, <= data.num_clients)."})
    min_replies: int = field(default=1, metadata={"help": "A round aggregates when at least this many clients replied."})
    eval_every: int = field(default=1, metadata={"help": "Evaluate the full model every k rounds (and always at the end)."})
    target_eval_loss: float = field(default=0.0, metadata={"help": "Report time/bytes/FLOPs to reach this eval loss; 0 = none."})
    seed: int = field(default=0, metadata={"help": "Seed of client sampling and LoRA initialisation."})
    client_cpus: float = field(default=1.0, metadata={"help": "CPUs per simulated client (Ray resources)."})
    client_gpus: float = field(default=0.0, metadata={"help": "GPU fraction per simulated client (Ray resources)."})
    client_eval: bool = field(
        default=False, metadata={"help": "Also evaluate the submodel LoRA on the sampled clients' training partitions each eval round (client_eval_loss: a training-set loss, pooled per response token)."}
    )
    wire_dtype: str = field(default="float32", metadata={"help": "dtype of LoRA arrays on the wire: float32 or float16."})
    wire_format: str = field(
        default="packed",
        metadata={"help": "LoRA payload layout: packed (one array per dtype + a manifest; fastest to aggregate) or "
                  "arrays (one Flower array per tensor, as ArrayRecord(state_dict) makes)."},
    )
    rebuild_frozen: bool = field(
        default=True,
        metadata={"help": "FFA-LoRA: clients rebuild the frozen A from federation.seed and the stage plans and "
                  "check it against the server's digest, so only B travels down (needs growth.lora_fusion = "
                  "factors); false: the server sends A with B every round."},
    )
    reply_timeout_s: float = field(default=3600.0, metadata={"help": "Seconds a round waits for client replies (> 0)."})
    aggregation_threads: int = field(
        default=0,
        metadata={"help": "CPU threads of the server's weighted sum and update norms: 0 = one per CPU the server "
                  "may use, at most 4 (two summed 32 clients 1.4-1.7x faster than one on a 2-vCPU VM, "
                  "docs/benchmarks.md); N >= 1 = N. Any count gives the same bits."},
    )
    max_update_norm: float = field(
        default=0.0,
        metadata={"help": "Norm bound on each client's update (Sun et al. 2019): a reply that moved further than "
                  "this (L2, from the LoRA it received; flora: its s·B·A) is scaled back onto the bound "
                  "before aggregation; 0 = no bound."},
    )
    max_update_norm_ratio: float = field(
        default=0.0,
        metadata={"help": "Relative norm bound: ratio × the round's median update norm (>= 1; 0 = off); with "
                  "max_update_norm too, the smaller bound applies."},
    )
    fault_injection: str = field(
        default="",
        metadata={
            "help": "TEST HOOK, leave empty: 'PARTITION:MODE,…' makes that client misbehave "
            f"(modes {', '.join(FAULT_MODES)})."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"federation.method must be one of {METHODS}, got method={self.method!r}")
        if self.aggregation not in RULES:
            raise ValueError(f"federation.aggregation must be one of {tuple(sorted(RULES))}, got "
                             f"aggregation={self.aggregation!r}")
        for name in ("num_rounds", "clients_per_round", "min_replies", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"federation.{name} must be >= 1, got {name}={getattr(self, name)!r}")
        if self.min_replies > self.clients_per_round:
            raise ValueError(
                f"federation.min_replies={self.min_replies} exceeds clients_per_round={self.clients_per_round}"
            )
        if self.target_eval_loss < 0 or not math.isfinite(self.target_eval_loss):
            raise ValueError(f"federation.target_eval_loss must be >= 0, got {self.target_eval_loss!r}")
        if not (self.client_cpus > 0 and math.isfinite(self.client_cpus)):
            raise ValueError(f"federation.client_cpus must be a finite number > 0, got client_cpus={self.client_cpus!r}")
        if not (self.client_gpus >= 0 and math.isfinite(self.client_gpus)):
            raise ValueError(f"federation.client_gpus must be a finite number >= 0, got client_gpus={self.client_gpus!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"federation.wire_dtype must be one of {WIRE_DTYPES}, got wire_dtype={self.wire_dtype!r}")
        if self.wire_format not in WIRE_FORMATS:
            raise ValueError(
                f"federation.wire_format must be one of {WIRE_FORMATS}, got wire_format={self.wire_format!r}")
        if self.aggregation_threads < 0:
            raise ValueError(f"federation.aggregation_threads must be >= 0 (0 = one per CPU, at most 4), got "
                             f"aggregation_threads={self.aggregation_threads!r}")
        check_bound_settings(self.max_update_norm, self.max_update_norm_ratio, prefix="federation.")
        if not self.reply_timeout_s > 0:
            raise ValueError(f"federation.reply_timeout_s must be > 0, got reply_timeout_s={self.reply_timeout_s!r}")
        if self.seed < 0:
            raise ValueError(f"federation.seed must be >= 0, got seed={self.seed!r}")
        self.faults()  # validates fault_injection

    def faults(self) -> dict[int, str]:
        """``fault_injection`` parsed to ``{partition_id: mode}`` (test hook; empty in real runs)."""
        out: dict[int, str] = {}
        for item in (p.strip() for p in self.fault_injection.split(",")):
            if not item:
                continue
            pid, sep, mode = item.partition(":")
            if not sep or not pid.strip().isdigit() or mode.strip() not in FAULT_MODES:
                raise ValueError(
                    f"federation.fault_injection items are PARTITION:MODE with MODE in {FAULT_MODES}, "
                    f"got fault_injection={self.fault_injection!r}"
                )
            if int(pid) in out:
                raise ValueError(f"federation.fault_injection names partition {int(pid)} twice (one mode each), "
                                 f"got fault_injection={self.fault_injection!r}")
            out[int(pid)] = mode.strip()
        return out


@dataclass
class RunConfig:
    """Everything a run needs; identical on the server and on every client."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    growth: GrowthSettings = field(default_factory=GrowthSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)

    def __post_init__(self) -> None:
        if self.federation.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"federation.clients_per_round={self.federation.clients_per_round} exceeds "
                f"data.num_clients={self.data.num_clients}"
            )


SECTIONS: dict[str, type] = typing.get_type_hints(RunConfig)


def _norm(key: str) -> str:
    return key.strip().replace("-", "_")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Convert ``value`` (from TOML, Flower's run config or a CLI string) to the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return _coerce(value, options[0], where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if isinstance(value, str):  # "4,8" or, as TOML writes a list, "[4, 8]"
            text = value.strip()
            text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            value = [v.strip("'\"") for v in (p.strip() for p in text.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{where} must be a list (or comma-separated string), got {value!r}")
        return tuple(_coerce(v, item, where) for v in value)
    if isinstance(value, list | tuple | dict):  # a TOML array or table where one value belongs
        raise ValueError(f"{where} expects {getattr(hint, '__name__', hint)}, got {value!r}")
    if isinstance(value, bool) and hint in (int, float):  # TOML true is not the number 1
        raise ValueError(f"{where} expects {hint.__name__}, got {value!r}")
    try:
        if hint is bool:
            if isinstance(value, float | int) and value not in (0, 1):
                raise ValueError
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} expects {getattr(hint, '__name__', hint)}, got {value!r}") from None
    return value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` → ``{"lora.r": 8}``."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_from_flat(values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """Build a :class:`RunConfig` from ``section.field`` keys on top of ``base`` (or the defaults)."""
    sections = {name: dataclasses.asdict(getattr(base or RunConfig(), name)) for name in SECTIONS}
    for raw_key, value in values.items():
        key = _norm(raw_key)
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise ValueError(f"unknown config key {raw_key!r}: sections are {sorted(SECTIONS)}")
        hints = typing.get_type_hints(SECTIONS[section])
        if name not in hints:
            raise ValueError(f"unknown config key {raw_key!r}: {section} has {sorted(hints)}")
        sections[section][name] = _coerce(value, hints[name], key)
    built = {name: SECTIONS[name](**fields) for name, fields in sections.items()}
    return RunConfig(**built)


def _local_path_builtins() -> dict[str, tuple[str, ...]]:
    """The keys that may name a local file or folder, with the names that never do (built-in ones)."""
    from devft.models.loading import EMBEDDED_MODELS

    return {"data.source": ("tasks",), "model.name": EMBEDDED_MODELS}


def _absolute_local(value: str, builtin: tuple[str, ...]) -> str:
    path = Path(value).expanduser()
    if value in builtin or not path.exists():
        return value
    return str(path.absolute())


def with_local_paths_absolute(config: RunConfig) -> RunConfig:
    """``config`` with a relative ``data.source`` or ``model.name`` that names an existing local file or folder
    made absolute (``~`` expanded), so the run directory's config.json names what the run read: ``devft eval``
    of its adapter, ``--resume`` and ``compare --reuse`` from another working directory find the same data.
    Built-in names (``tasks``, the embedded models) and what does not exist here (a hub id) stay as written."""
    builtins = _local_path_builtins()
    source = _absolute_local(config.data.source, builtins["data.source"])
    name = _absolute_local(config.model.name, builtins["model.name"])
    if (source, name) == (config.data.source, config.model.name):
        return config
    return dataclasses.replace(config, data=dataclasses.replace(config.data, source=source),
                               model=dataclasses.replace(config.model, name=name))


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a TOML config (sections as tables) and apply ``overrides`` (``section.field`` → value)."""
    values = _read_toml(Path(path)) if path is not None else {}
    values.update({_norm(k): v for k, v in (overrides or {}).items()})
    return config_from_flat(values)


def _read_toml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Flat values of a TOML config; a top-level ``extends = "other.toml"`` (relative to the file) is read
    first and overridden by the file's own values, so variants of a config name only what they change."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist" if not path.exists()
                                else f"config file {str(path)!r} is not a file")
    if path.resolve() in seen:
        raise ValueError(f"config file {str(path)!r} extends itself (cycle: {[str(p) for p in seen]})")
    with path.open("rb") as fh:
        try:
            raw = tomllib.load(fh)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from err
    parent = raw.pop("extends", None)
    if parent is not None and not isinstance(parent, str):
        raise ValueError(f"config file {str(path)!r}: extends must be a file name (a string), got {parent!r}")
    if parent and not (path.parent / parent).is_file():
        raise FileNotFoundError(f"config file {str(path)!r} extends {parent!r}, which is no file (looked for "
                                f"{(path.parent / parent).absolute()}; extends is relative to the extending file)")
    values = _read_toml(path.parent / parent, (*seen, path.resolve())) if parent else {}
    own: dict[str, Any] = {}
    for key, value in flatten(raw).items():  # max-steps and max_steps are one key: normalised before merging
        if _norm(key) in own:
            raise ValueError(f"config file {str(path)!r} sets {_norm(key)} twice (as {key!r} too)")
        own[_norm(key)] = value
    values.update(own)
    return values


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["lora.r=16", "data.alpha=0.3"]`` → mapping; refuses items without ``=``. A value in matching quotes
    is a TOML string (``model.name="tiny-llama"``, as Flower's ``--run-config`` writes it): the quotes go."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = _unquoted(value.strip())
    return out


def _unquoted(value: str) -> str:
    if len(value) < 2 or value[0] != value[-1] or value[0] not in "'\"":
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:  # not one TOML string ('"q_proj","v_proj"', 'C:\\x'): as typed, as before
        return value


def config_to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """Nested plain dict (tuples as lists), e.g. for summary.json."""
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(config, name)).items()} for name in SECTIONS}


def config_to_flat(config: RunConfig) -> dict[str, bool | int | float | str]:
    """Flat ``section.field`` scalars (tuples as comma strings): what Flower's run config can carry."""
    return flatten_config_dict(config_to_dict(config))


def flatten_config_dict(nested: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{section: {field: value}}`` (as config.json holds it) → flat ``section.field`` (lists as comma strings)."""
    flat: dict[str, Any] = {}
    for section, fields in nested.items():
        for key, value in fields.items():
            flat[f"{section}.{key}"] = ",".join(str(v) for v in value) if isinstance(value, list) else value
    return flat


def changed_keys(saved: Mapping[str, Any], config: RunConfig) -> list[str]:
    """The flat keys whose value in ``saved`` (a run's flat config) differs from ``config``'s. A key ``saved``
    lacks counts as its default: the run was written before the key existed, and every new key's default
    keeps the behaviour from before it."""
    now, defaults = config_to_flat(config), config_to_flat(RunConfig())
    saved = dict(saved)
    # a local path counts as the file it names here: runs from before the CLI made paths absolute (and any run
    # of flwr run, whose config the CLI never reads) keep them as typed
    for key, builtin in _local_path_builtins().items():
        for flat in (saved, now):
            if isinstance(flat.get(key), str):
                flat[key] = _absolute_local(flat[key], builtin)
    return sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))


def describe(quickstart: RunConfig | None = None) -> str:
    """Every key with its default and help text (``devft config``); with ``quickstart``, each key that config
    sets to another value says so (``[quickstart: …]``)."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"[{section}]  {(cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            there = getattr(getattr(quickstart, section), f.name) if quickstart is not None else default
            mark = f" [quickstart: {there!r}]" if there != default else ""
            lines.append(f"  {f.name} = {default!r}{mark}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def to_flwr_run_config(config: RunConfig) -> str:
    """Every key of ``config`` as a flat TOML file for ``flwr run . --run-config FILE`` (Flower resolves no
    ``extends`` and takes no ``key=value`` pairs beside a file, so the file must hold everything)."""
    lines = []
    for key, value in config_to_flat(config).items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                             "inf" if value > 0 else "-inf")  # TOML's spellings
        else:
            # a TOML basic string: JSON's escapes, plus DEL, which TOML wants escaped and JSON leaves as it is
            text = json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
