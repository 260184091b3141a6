"""Sequence mixers: one module per mixer, each holding exactly one Mixer subclass with its Config.

The module is the registry: `make_mixer("mamba2", d_model=64, d_state=32)` imports
`models.mixers.mamba2` and builds the Mixer defined there, so adding a mixer is adding a file (plus
its config in conf/model/). Each mixer takes only the hyper-parameters its Config declares.

    mixer = make_mixer("mamba2", d_model=64, d_state=32, headdim=16)
    mixer(x)  # (batch, seqlen, 64) -> (batch, seqlen, 64)
"""
import importlib
import importlib.util
import pkgutil

from models.mixers.base import Mixer


def available_mixers() -> list[str]:
    """Names of the modules in `models/mixers/` that define a Mixer subclass, sorted."""
    names = (info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    return sorted(n for n in names if _mixer_classes(importlib.import_module(f"{__name__}.{n}")))


def mixer_class(name: str) -> type[Mixer]:
    """The Mixer subclass defined in `models.mixers.<name>`; ValueError for an unknown name."""
    is_module = (isinstance(name, str) and name.isidentifier()
                 and importlib.util.find_spec(f"{__name__}.{name}") is not None)
    classes = _mixer_classes(importlib.import_module(f"{__name__}.{name}")) if is_module else []
    if not classes:
        raise ValueError(f"mixer={name!r}: must be one of {', '.join(available_mixers())}")
    if len(classes) > 1:
        found = ", ".join(c.__name__ for c in classes)
        raise TypeError(f"models.mixers.{name} defines {len(classes)} Mixer subclasses ({found}): "
                        f"a mixer file holds exactly one")
    return classes[0]


def split_params(names, params: dict) -> dict[str, dict]:
    """`params` shared out among the mixers `names`: each gets the keys its Config declares.

    A key that none of them declares (misspelled, or another mixer's) is a TypeError naming it,
    as Python's own for an unexpected keyword argument.
    """
    names = sorted(set(names))
    declared = {name: mixer_class(name).hyperparameters()[1:] for name in names}  # d_model is the LM's
    for key, value in params.items():
        if not any(key in keys for keys in declared.values()):
            whose = f"mixer {names[0]!r}" if len(names) == 1 else f"mixers {', '.join(map(repr, names))}"
            allowed = ", ".join(dict.fromkeys(k for keys in declared.values() for k in keys))
            raise TypeError(f"{key}={value!r}: not a parameter of {whose} (allowed: {allowed})")
    return {name: {k: v for k, v in params.items() if k in keys} for name, keys in declared.items()}


def make_mixer(name: str, d_model: int, **params) -> Mixer:
    """The mixer `name` of width d_model built from `params`; a key it does not declare is a TypeError."""
    return mixer_class(name)(d_model, **split_params([name], params)[name])


def _mixer_classes(module) -> list[type[Mixer]]:
    """The mixers defined in `module`: Mixer subclasses with their own Config (a shared base such as
    models.mixers.ssm.SSMMixer has none)."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Mixer) and obj.__module__ == module.__name__
            and "Config" in vars(obj)]


__all__ = ["Mixer", "available_mixers", "make_mixer", "mixer_class", "split_params"]
