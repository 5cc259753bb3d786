"""YAML <-> RunConfig, with dotted command-line overrides.

* ``load_config(path, ["training.lr=3e-5", "parallel.tensor_model_parallel_size=2"])``.
* YAML is read with ``yaml.safe_load`` only. Values of overrides are parsed as YAML scalars/lists
  (``3e-5`` -> float, ``true`` -> bool, ``[1, 2]`` -> list, ``null`` -> None).
* Unknown keys, wrong types and invalid combinations raise :class:`ConfigError` whose message
  starts with the file and the key path (``configs/x.yaml: training.lr: ...``).
* ``model.preset`` selects an architecture from :mod:`harpe_megatron.config.presets`; the other
  ``model.*`` keys override its fields.
* ``config_to_dict`` gives the resolved tree (what is written to the run dir and checkpoints).
* Renamed keys are read for one release with a :class:`ConfigDeprecationWarning` naming the new
  key: ``positional.apply_rope_fusion: true|false`` is now ``positional.per_head_rope: fused|table``.
* ``stages:`` (multi-stage schedules) are dotted overrides too: :func:`stage_run_config` applies
  one stage's overrides to the resolved run tree; every stage is built when the config loads, so
  a bad key or value in a stage fails at load time naming the stage. :func:`stage_config` adds the
  stage's own run directory (``<run_dir>/<i>_<name>/``, :mod:`harpe_megatron.run_dir`) and initial
  weights: the plain run config that training/stages.py runs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from harpe_megatron.config.model import ModelConfig, PositionalConfig
from harpe_megatron.config.presets import PRESETS
from harpe_megatron.config.run import RunConfig, StageConfig
from harpe_megatron.positional.bases import BASE_STRATEGIES, BaseStrategy
from harpe_megatron.positional.position_ids import POSITION_SCHEMES, PositionScheme
from harpe_megatron.positional.scaling import ROPE_SCALINGS, RopeScaling
from harpe_megatron.run_dir import RunDir

_POLYMORPHIC = {BaseStrategy: (BASE_STRATEGIES, "strategy"), RopeScaling: (ROPE_SCALINGS, "type"),
                PositionScheme: (POSITION_SCHEMES, "type")}

__all__ = ["ConfigError", "ConfigDeprecationWarning", "load_config", "config_from_dict", "config_to_dict",
           "apply_overrides", "save_config", "stage_run_config", "stage_config", "plain_run_configs"]


class ConfigError(ValueError):
    """A configuration problem; the message names the source and the key path."""


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict[str, Any], key: str, value: Any, label: str) -> None:
    """``tree[a][b][c] = value`` for ``key`` ``a.b.c`` (sections created as needed)."""
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"{label}: empty key component")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{label}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries on a nested dict (creating sections as needed)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        _set_dotted(tree, key, _yaml_scalar(value), f"override {item!r}")
    return tree


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{path}: may not be null")
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e6" (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        sub = f"{path}.{name}" if path else name
        inner, _ = _strip_optional(tp)
        variant_base = next((b for b in _POLYMORPHIC if isinstance(inner, type) and issubclass(inner, b)), None)
        if variant_base is not None:
            if value is None:
                kwargs[name] = _coerce(value, tp, sub)
                continue
            registry, key = _POLYMORPHIC[variant_base]
            kwargs[name] = _build_variant(value, sub, registry, key)
        elif dataclasses.is_dataclass(inner):
            kwargs[name] = _build_section(inner, value, sub)
        elif typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            if value is None:
                kwargs[name] = _coerce(value, tp, sub)
                continue
            if not isinstance(value, list):
                raise ConfigError(f"{sub}: expected a list of mappings, got {type(value).__name__}")
            kwargs[name] = [_build(typing.get_args(inner)[0], v, f"{sub}[{i}]") for i, v in enumerate(value)]
        else:
            kwargs[name] = _coerce(value, tp, sub)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(path) or not path else f"{path}: {msg}") from None


def _build_variant(data: Any, path: str, registry: dict[str, type], key: str) -> Any:
    """A section whose ``key`` entry picks the dataclass (``bases.strategy``, ``scaling.type``)."""
    if not isinstance(data, dict) or key not in data:
        raise ConfigError(f"{path}: expected a mapping with a {key!r} key, one of {sorted(registry)}")
    fields = dict(data)
    name = fields.pop(key)
    if name not in registry:
        raise ConfigError(f"{path}.{key}: unknown {key} {name!r}; expected one of {sorted(registry)}")
    return _build(registry[name], fields, path)


def _build_section(cls: type, data: Any, path: str) -> Any:
    if cls is ModelConfig and isinstance(data, dict) and "preset" in data:
        data = dict(data)
        name = data.pop("preset")
        if name not in PRESETS:
            raise ConfigError(f"{path}.preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        base = {f.name: getattr(PRESETS[name], f.name) for f in dataclasses.fields(ModelConfig)}
        data = {**base, **data}
    return _build(cls, data, path)


class ConfigDeprecationWarning(UserWarning):
    """A config key that was renamed: still read for one release, refused after that.

    A ``UserWarning`` (shown by default, and not silenced by the command-line tools, which hide
    libraries' ``FutureWarning``s)."""


def _upgrade_renamed_keys(tree: dict[str, Any], source: str) -> dict[str, Any]:
    """``positional.apply_rope_fusion: true|false`` (it shared its name with megatron-core's
    unrelated ``TransformerConfig.apply_rope_fusion``) -> ``positional.per_head_rope: fused|table``,
    with a :class:`ConfigDeprecationWarning`. Saved run configs and checkpoints of older versions
    carry the old key, which is why it is still read."""
    positional = tree.get("positional") if isinstance(tree, dict) else None
    if not isinstance(positional, dict) or "apply_rope_fusion" not in positional:
        return tree
    positional = dict(positional)
    old = positional.pop("apply_rope_fusion")
    if not isinstance(old, bool):
        raise ConfigError(f"{source}: positional.apply_rope_fusion: expected true/false, got {old!r} (the key is "
                          "deprecated: use positional.per_head_rope: fused|table)")
    value = "fused" if old else "table"
    if positional.get("per_head_rope", value) != value:
        raise ConfigError(f"{source}: positional.apply_rope_fusion={str(old).lower()} contradicts "
                          f"positional.per_head_rope={positional['per_head_rope']}; drop apply_rope_fusion (its old name)")
    positional["per_head_rope"] = value
    warnings.warn(f"{source}: positional.apply_rope_fusion is deprecated and will be refused in the next release; "
                  f"read as positional.per_head_rope: {value} (fused: RoPE applied inside attention from positions, "
                  "table: megatron's unfused path on an angle table; unrelated to megatron-core's apply_rope_fusion)",
                  ConfigDeprecationWarning, stacklevel=2)
    return {**tree, "positional": positional}


# The old stage form (before stages became dotted overrides) -> the override it means now.
_OLD_STAGE_KEYS = {"seq_length": "data.seq_length", "train_iters": "training.train_iters",
                   "train_tokens": "training.train_tokens", "lr": "training.lr", "min_lr": "training.min_lr",
                   "global_batch_size": "training.global_batch_size"}


def _reject_old_stage_form(tree: dict[str, Any]) -> None:
    """A stage written in the old form (``{name, seq_length, rope_base, ...}``) fails with the new
    form of the same stage, ready to paste."""
    stages = tree.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else []):
        if not isinstance(stage, dict) or "overrides" in stage:
            continue
        old = [k for k in stage if k in _OLD_STAGE_KEYS or k == "rope_base"]
        if not old:
            continue
        overrides = {_OLD_STAGE_KEYS[k]: v for k, v in stage.items() if k in _OLD_STAGE_KEYS}
        if "rope_base" in stage:
            overrides["positional.bases"] = {"strategy": "constant", "base": stage["rope_base"]}
        new = {"name": stage.get("name", "stage"), "overrides": overrides}
        raise ConfigError(
            f"stages[{i}]: {sorted(old)} are the old stage keys; a stage is now a name and dotted overrides of "
            f"the run config (any key can be staged), write: "
            f"{yaml.safe_dump(new, default_flow_style=True, sort_keys=False, width=1 << 16).strip()}"
        )


def _drop_removed_keys(tree: dict[str, Any]) -> dict[str, Any]:
    """Saved configs (run dirs, checkpoints) from before ``data.build_demo_corpus`` was removed carry
    it; it only ever told the launcher to build demo data, so a saved one is dropped here.
    :func:`load_config` rejects it in the configs users write."""
    data = tree.get("data")
    if isinstance(data, dict) and "build_demo_corpus" in data:
        tree = {**tree, "data": {k: v for k, v in data.items() if k != "build_demo_corpus"}}
    return tree


def stage_run_config(cfg: RunConfig, stage: StageConfig, index: int) -> RunConfig:
    """The run config of one stage: ``cfg``'s resolved tree with the stage's overrides applied.

    ``stages`` itself is dropped. A stage that sets one of ``training.train_iters`` /
    ``training.train_tokens`` clears the other (each stage says how long it trains). Errors are
    :class:`ConfigError` naming the stage: ``stages[1] (s2): training: unknown key(s) ['lrr']``.
    """
    tree = config_to_dict(cfg)
    tree["stages"] = None
    keys = set(stage.overrides)
    for own, other in (("training.train_iters", "training.train_tokens"),
                       ("training.train_tokens", "training.train_iters")):
        if own in keys and other not in keys:
            tree["training"][other.split(".")[1]] = None
    label = f"stages[{index}] ({stage.name})"
    try:
        for key, value in stage.overrides.items():
            _set_dotted(tree, key, copy.deepcopy(value), f"override {key!r}")
        return _build_section(RunConfig, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{label}: {str(exc).lstrip(': ')}") from None


def stage_config(cfg: RunConfig, index: int, stage: StageConfig, pretrained: str | None) -> RunConfig:
    """The plain run config of stage ``index``: its overrides applied, its own run dir and
    checkpoint dir, ``pretrained`` as initial weights."""
    scfg = stage_run_config(cfg, stage, index)
    run_dir = RunDir(cfg.run_dir).stage(index, stage.name)
    checkpoint = dataclasses.replace(scfg.checkpoint, save=str(run_dir.checkpoints), load=None,
                                     pretrained=pretrained)
    return dataclasses.replace(scfg, checkpoint=checkpoint, run_dir=str(run_dir.root), stages=None)


def plain_run_configs(cfg: RunConfig) -> list[tuple[str, RunConfig]]:
    """(label, config) of every plain run ``cfg`` launches: itself, or one per stage, each with the
    run's ``checkpoint.pretrained`` as initial weights (what checking and planning need)."""
    if not cfg.stages:
        return [("run", cfg)]
    return [(f"stage {i} ({s.name})", stage_config(cfg, i, s, cfg.checkpoint.pretrained))
            for i, s in enumerate(cfg.stages)]


def config_from_dict(tree: dict[str, Any], source: str = "<config>") -> RunConfig:
    """Build and validate a RunConfig (and every stage's); errors are prefixed with ``source``.
    Renamed keys are read with a warning (:func:`_upgrade_renamed_keys`)."""
    tree = _upgrade_renamed_keys(tree or {}, source)
    try:
        tree = _drop_removed_keys(tree)
        _reject_old_stage_form(tree)
        cfg = _build_section(RunConfig, tree, "")
        for i, stage in enumerate(cfg.stages or []):
            stage_run_config(cfg, stage, i)
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"{source}: {str(exc).lstrip(': ')}") from None


def load_config(path: Optional[str | os.PathLike], overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    apply_overrides(tree, overrides)
    source += f" (with overrides {list(overrides)})" if overrides else ""
    if isinstance(tree.get("data"), dict) and "build_demo_corpus" in tree["data"]:
        raise ConfigError(
            f"{source}: data.build_demo_corpus was removed: training launches no longer build data. "
            "Delete the key; the demo data is built by scripts/demo.sh, or by "
            "'python -m harpe_megatron.cli.prepare_run --config CONFIG [overrides]' for a config whose "
            "data.paths / data.tokenizer_model point at a demo build (configs/tiny_cpu.yaml: data/demo)"
        )
    return config_from_dict(tree, source)


def _plain(value: Any) -> Any:
    if isinstance(value, (BaseStrategy, RopeScaling, PositionScheme, PositionalConfig)):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain YAML-able data (loads back to an equal RunConfig)."""
    return _plain(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
