"""Synthetic tasks: one module per task, each holding exactly one `tasks.base.Task` subclass.

The module is the registry: `make_dataset("mqar", ...)` imports `tasks.mqar` and uses the Task
subclass defined there, so adding a task is adding a file (plus its config in conf/task/).

    data = make_dataset("mqar", num_examples=1000, seed=0,
                        vocab_size=8192, seq_len=64, num_kv_pairs=4)
    data.inputs, data.labels  # (1000, 64) int64; labels are -100 where not scored
    data.slices               # {"num_kv_pairs": (1000,), "seq_len": (1000,)}
"""
import dataclasses
import importlib
import importlib.util
import pkgutil

from tasks.base import Task, TaskData


def available_tasks() -> list[str]:
    """Names of the modules in `tasks/` that define a Task subclass, sorted."""
    names = (info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    return sorted(n for n in names if _task_classes(importlib.import_module(f"{__name__}.{n}")))


def task_class(name: str) -> type[Task]:
    """The Task subclass defined in `tasks.<name>`; ValueError for an unknown name."""
    is_module = (isinstance(name, str) and name.isidentifier()
                 and importlib.util.find_spec(f"{__name__}.{name}") is not None)
    classes = _task_classes(importlib.import_module(f"{__name__}.{name}")) if is_module else []
    if not classes:
        raise ValueError(f"name={name!r}: unknown task (available: {', '.join(available_tasks())})")
    if len(classes) > 1:
        found = ", ".join(c.__name__ for c in classes)
        raise TypeError(f"tasks.{name} defines {len(classes)} Task subclasses ({found}): "
                        f"a task file holds exactly one")
    return classes[0]


def make_task(name: str, **params) -> Task:
    """The task `name` built from `params`; a misspelled or missing parameter is a ValueError."""
    cls = task_class(name)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    allowed = ", ".join(f.name for f in fields)
    for key, value in params.items():
        if key not in {f.name for f in fields}:
            raise ValueError(f"{key}={value!r}: not a parameter of task {name!r} "
                             f"(allowed: {allowed})")
    for f in fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in params:
            raise ValueError(f"{f.name}: missing, task {name!r} requires it "
                             f"(parameters: {allowed})")
    return cls(**params)


def make_dataset(name: str, num_examples: int, seed: int, **params) -> TaskData:
    """`num_examples` examples of task `name` with parameters `params`, generated from `seed`.

    Pure: the same arguments give identical tensors; different seeds give different data.
    """
    return make_task(name, **params).generate(num_examples, seed)


def _task_classes(module) -> list[type[Task]]:
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Task) and obj is not Task
            and obj.__module__ == module.__name__]


__all__ = ["Task", "TaskData", "available_tasks", "make_dataset", "make_task", "task_class"]
