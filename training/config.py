"""The configuration: composing it from conf/, and a user's mistake in it said in one line.

`ConfigError` is a user's mistake; `config_errors` turns what a constructor raises into one, naming
the key and its value; `describe_compose_error` does the same for Hydra's composition errors;
`exit_user_error` prints the line and exits with status 2. Every script reports through these.
"""
import contextlib
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

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
        options = e.options or []
        return f"{group}={name}: unknown {group}; allowed: {', '.join(sorted(options))}"
    cause = e
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if isinstance(cause, ConfigKeyError) or "not in struct" in str(cause):
        full_key = getattr(cause, "full_key", None) or ""
        bad = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key
                    or o.lstrip("+~").startswith(full_key + ".")), full_key)
        parent = full_key.rpartition(".")[0]
        # The keys that do exist, under the same group choices (task=..., model=...).
        groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
        choices = [o for o in overrides if o.split("=", 1)[0] in groups]
        root = compose(choices, config_name)
        node = OmegaConf.select(root, parent) if parent else root
        allowed = ", ".join(k for k in node.keys() if not str(k).startswith("_")) if node else ""
        return f"{bad}: unknown key '{full_key}'; allowed in {parent or 'the config'}: {allowed}"
    return str(e).strip().splitlines()[0]


def compose(overrides, config_name="train", hydra_config=False) -> DictConfig:
    """Compose a config from `conf/` (for tests, sweeps and the pre-flight check), strict. Inside
    @hydra.main it composes with the running app's Hydra (same conf/)."""
    if GlobalHydra.instance().is_initialized():
        return hydra.compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_config)
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra.compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra_config)


def exit_user_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


def _config_groups(config_name: str) -> str:
    """`group: option, ...` for the groups in conf/<config_name>.yaml's defaults (run.py --help); a
    global preset (experiment/) is listed only when its keys are that config's."""
    primary = OmegaConf.load(Path(CONF_DIR) / f"{config_name}.yaml")
    # Not a group chosen by another's choice (recipe: ${model}): the user picks the model.
    entries = [next(iter(d.items())) for d in OmegaConf.to_container(primary.defaults) if isinstance(d, dict)]
    groups = [g for g, choice in entries if "/" not in g and not str(choice).startswith("${")]
    keys = {*primary.keys(), *groups}
    lines = []
    for group in groups:
        options = []
        for path in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            text = path.read_text()
            if "@package _global_" in text.split("\n", 1)[0] and not set(OmegaConf.create(text)) <= keys:
                continue
            options.append(path.stem)
        lines.append(f"{group}: {', '.join(options)}")
    return "\n".join(lines)


OmegaConf.register_new_resolver("config_groups", _config_groups, replace=True)
