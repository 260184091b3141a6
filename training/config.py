"""The configuration: composing it from conf/ onto its schema, and a user's mistake in it said in one line.

`ConfigError` is a user's mistake; `config_errors` turns what a constructor raises into one, naming
the key and its value; `check_schema` applies a schema's rules (training.schemas); `describe_compose_error`
says Hydra's composition errors (an unknown option or key, a value of the wrong type) the same way;
`exit_user_error` prints the line and exits with status 2. Every script reports through these.
"""
import contextlib
import dataclasses
import os
import re
import sys
import types
import typing
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from training import schemas

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
USER_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A user's mistake in the configuration: reported as one line, never as a traceback."""


def show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _name_the_key(group: str, node, message: str) -> str:
    """`group.key=value: message`. Our own checks start with `key=`; a library's message (torch's
    "Invalid learning rate: -1") is given the key it names, or else the key whose value it quotes."""
    if not group:
        return message
    if re.match(r"^[A-Za-z_][\w.\[\]]*\s*[=:]", message):
        return f"{group}.{message}"
    items = {k: v for k, v in node.items() if not str(k).startswith("_")} if isinstance(node, dict) else {}
    for pattern in (r"(?<!\w){}=|`{}`", r"\b{}\b"):  # `key` or key= first: "devices=0 ... cpu accelerator"
        for key, value in items.items():
            if re.search(pattern.format(*[re.escape(str(key))] * 2), message, re.IGNORECASE):
                return f"{group}.{key}={show(value)}: {message}"
    for key, value in items.items():
        for v in (value if isinstance(value, list) else [value]):
            if v is not None and re.search(rf"(?<![\w.]){re.escape(str(v))}(?![\w.])", message):
                return f"{group}.{key}={show(value)}: {message}"
    return f"{group}: {message}"


@contextlib.contextmanager
def config_errors(group, node=None, catch=(ValueError, TypeError, OmegaConfBaseException, HydraException)):
    """Turn what a constructor raises (`catch`) into a ConfigError naming `group.key` and its value;
    `node` is the group's config, to find the key that a library's message does not name."""
    try:
        yield
    except ConfigError:
        raise
    except catch as e:
        while e.__cause__ is not None and isinstance(e, HydraException):  # unwrap instantiate()
            e = e.__cause__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else None
        raise ConfigError(_name_the_key(group, values, msg)) from e


def describe_compose_error(e: Exception, overrides, config_name="train") -> str:
    """One line for a Hydra composition error: the key, the bad value, what is allowed."""
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group = os.path.dirname(e.missing_cfg_file)
        name = os.path.basename(e.missing_cfg_file)
        allowed = ", ".join(sorted(e.options or []))
        return f"{group}={name}: unknown {group}; allowed: {allowed}{_elsewhere(group, name, config_name)}"
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) or "not in struct" in str(cause):
        full_key = getattr(cause, "full_key", None) or ""
        bad = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key
                    or o.lstrip("+~").startswith(full_key + ".")), full_key)
        parent = full_key.rpartition(".")[0]
        # The keys that do exist, under the same group choices (task=..., model=...).
        root = compose(_group_choices(overrides), config_name)
        node = OmegaConf.select(root, parent) if parent else root
        allowed = ", ".join(k for k in node.keys() if not str(k).startswith("_")) if node else ""
        return f"{bad}: unknown key '{full_key}'; allowed in {parent or 'the config'}: {allowed}"
    if isinstance(cause, ValidationError) and cause.full_key:
        wrong = f"{cause.full_key}={show(cause.value)}"
        rule = _allowed(cause, config_name, types=False)
        if rule is not None:
            return f"{wrong}: must be {rule}"
        said = _allowed(cause, config_name, types=True)
        return _built_with(cause, overrides, config_name) or \
            f"{wrong}: {f'must be {said}' if said else str(cause).strip().splitlines()[0]}"
    return str(e).strip().splitlines()[0]


def _group_choices(overrides) -> list[str]:
    """The overrides that choose a config group (task=..., model=...)."""
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    return [o for o in overrides if o.split("=", 1)[0] in groups]


def _allowed(error: ValidationError, config_name: str, types: bool) -> str | None:
    """What the schema allows at the key a value of the wrong type was given for (its rule; with
    `types`, else its type): the field of the structured node it failed in, else the field found
    from the config's root schema."""
    owner = error.object_type
    if dataclasses.is_dataclass(owner):
        said = field_phrase(owner, error.full_key.rpartition(".")[2], types)
        if said is not None:
            return said
    root = schemas.SCHEMAS.get(config_name)
    return field_phrase(root, error.full_key, types) if root is not None else None


def _built_with(error: ValidationError, overrides, config_name: str) -> str | None:
    """What the constructor of the node holding a wrongly typed value says of it: a task's or a
    model's own checks declare its ranges (tasks/, models/), so `task.seq_len=abc` reads as
    `task.seq_len=0` does. The node is composed with the command's group choices, without the value."""
    group, _, key = error.full_key.rpartition(".")
    if "[" in key:  # an element of a list: said by its type
        return None
    try:
        node = OmegaConf.select(compose(_group_choices(overrides), config_name), group) if group else None
        if not isinstance(node, DictConfig) or "_target_" not in node:
            return None
        values = OmegaConf.to_container(node, resolve=True)
    except (HydraException, OmegaConfBaseException):
        return None
    values[key] = error.value
    try:
        with config_errors(group, OmegaConf.create(values), catch=Exception):
            hydra.utils.instantiate(values)
    except ConfigError as e:
        return str(e)
    return None


def _elsewhere(group: str, name: str, config_name: str) -> str:
    """` (name is a preset of distill.py ...)` when another script's config has `group/name`."""
    for path in sorted(Path(CONF_DIR).glob(f"*/{group}/{name}.yaml")):
        other = path.parents[1].name
        if other == config_name or not (Path(CONF_DIR) / f"{other}.yaml").is_file():
            continue
        app = OmegaConf.load(Path(CONF_DIR) / f"{other}.yaml").hydra.help.app_name
        own = {f.name for f in dataclasses.fields(schemas.SCHEMAS[config_name])}
        keys = sorted(set(OmegaConf.load(path)) - own - {"defaults"})
        return f" ({name} is a preset of {app}, for its settings {', '.join(keys)}: python {app} {group}={name})"
    return ""


def compose(overrides, config_name="train", hydra_config=False) -> DictConfig:
    """Compose a config from `conf/` (for tests, sweeps and the pre-flight check), strict. Inside
    @hydra.main it composes with the running app's Hydra (same conf/)."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_config)
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_config)


def check_schema(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """Every rule of `schema` (training.schemas) on `cfg`, a config composed onto it:
    ConfigError `key=value: must be ...` for the first value a rule refuses. A section given a
    mapping (schemas.section) is typed here, in place: its defaults filled in, its types checked."""
    for f in dataclasses.fields(schema):
        rule, each, inner = f.metadata.get("rule"), f.metadata.get("each"), _dataclass_of(f.type)
        if f.metadata.get("section") is not None and cfg.get(f.name) is not None:
            inner = f.metadata["section"]
            cfg[f.name] = _typed(cfg[f.name], inner, f"{prefix}{f.name}")
        # Only what has a rule is read: another value may be an interpolation resolved later (run_dir).
        if f.name not in cfg.keys() or (rule is None and each is None and inner is None):  # keys(): also ???
            continue
        if OmegaConf.is_missing(cfg, f.name):
            raise ConfigError(f"{prefix}{f.name}: missing; give it a value")
        node = cfg[f.name]
        if node is None:
            continue
        value = OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node
        if rule is not None and not rule.allows(value):
            # A float setting holds `target_acc=2` as 2.0: said as the user wrote it.
            given = int(value) if isinstance(value, float) and value.is_integer() else value
            raise ConfigError(f"{prefix}{f.name}={show(given)}: must be {rule.says}")
        for i, item in enumerate(value if each is not None else ()):
            if not each.allows(item):
                raise ConfigError(f"{prefix}{f.name}[{i}]={show(item)}: must be {each.says}")
        if inner is not None:
            check_schema(node, inner, f"{prefix}{f.name}.")


def _typed(node, schema: type, key: str) -> DictConfig:
    """`node` merged onto `schema`; a ConfigError for a key or a type the schema refuses."""
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{key}={show(node)}: must be a mapping")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), node)
    except (ConfigKeyError, ConfigAttributeError) as e:
        allowed = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{key}.{e.key}: unknown key; allowed: {allowed}") from None
    except ValidationError as e:
        raise ConfigError(f"{key}.{e.full_key}={show(e.value)}: must be {field_phrase(schema, e.full_key)}") from None


def field_phrase(schema: type, key: str, types: bool = True) -> str | None:
    """What `key` (dotted from `schema`; `a.b[0]` is an element of a.b) allows, completing "must be":
    its rule, or (with `types`) its type in config words; None where the schema says neither."""
    hint, meta = schema, {}
    for part in key.replace("[", ".[").split("."):
        if part.startswith("["):  # an element: the list's `each` rule, or its element type
            hint, meta = (typing.get_args(_strip_optional(hint)) or (typing.Any,))[0], {"rule": meta.get("each")}
            continue
        owner = _dataclass_of(hint)
        f = next((f for f in dataclasses.fields(owner) if f.name == part), None) if owner else None
        if f is None:
            return None
        hint, meta = f.type, f.metadata
    rule = meta.get("rule")
    if rule is not None:
        return rule.says
    return _type_words(hint) if types else None


def _strip_optional(hint):
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _dataclass_of(hint) -> type | None:
    hint = _strip_optional(hint)
    return hint if dataclasses.is_dataclass(hint) else None


def _type_words(hint) -> str | None:
    """int -> "an integer", Optional[int] -> "an integer or null", ...; None for Any."""
    inner = _strip_optional(hint)
    origin = typing.get_origin(inner) or inner
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping"}.get(origin)
    if words is None and dataclasses.is_dataclass(inner):
        words = "a mapping"
    if words is None:
        return None
    return f"{words} or null" if inner is not hint else words


def exit_user_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def _config_groups(config_name: str) -> str:
    """`group: option, ...` for the groups in conf/<config_name>.yaml's defaults (run.py --help),
    with the options in its search path too (distill.py's presets, conf/distill/experiment/)."""
    primary = OmegaConf.load(Path(CONF_DIR) / f"{config_name}.yaml")
    searchpath = OmegaConf.select(primary, "hydra.searchpath")
    roots = [Path(CONF_DIR), *(Path(p.removeprefix("file://")) for p in
                               (OmegaConf.to_container(searchpath, resolve=True) if searchpath else []))]
    # Not a group chosen by another's choice (recipe: ${model}), nor the schema (not a folder of conf/).
    entries = [next(iter(d.items())) for d in OmegaConf.to_container(primary.defaults) if isinstance(d, dict)]
    groups = [g for g, choice in entries if "/" not in g and not str(choice).startswith("${")
              and (Path(CONF_DIR) / g).is_dir()]
    lines = []
    for group in groups:
        options = sorted({path.stem for root in roots for path in (root / group).glob("*.yaml")})
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("config_groups", _config_groups, replace=True)
# conf/distill.yaml's search path names conf/ by it: Hydra takes a relative file:// path from the
# working directory, and a script may be started from anywhere.
OmegaConf.register_new_resolver("conf_dir", lambda: CONF_DIR, replace=True)
schemas.register()
