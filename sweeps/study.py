"""The Optuna study behind a sweep: storage, the enqueue-once queue of slots, heartbeats.

Exactly-once across workers (processes or machines sharing one storage):
1. Every slot (cell × trial index) is enqueued as a WAITING trial with user attrs `slot` and `cell`,
   under the *queue lock*, by whichever worker finds it missing: a later worker enqueues nothing.
2. A worker takes a WAITING trial by switching it to RUNNING, also under the queue lock (SQLite's
   driver does not make Optuna's read-then-update atomic across processes; PostgreSQL's
   SELECT ... FOR UPDATE does, and the lock costs nothing there).
3. A worker that dies stops its heartbeat; after the grace period any worker fails the trial and
   Optuna's retry callback enqueues a copy with the same params and user attrs (same slot).
4. Safety net for storages without a queue lock: a popped trial whose slot already has a finished
   trial, or an earlier live one, is closed as FAIL with user attr `duplicate_of` and never trained.

The queue lock is an exclusive `flock` next to an SQLite file (one machine) or a PostgreSQL
advisory lock (many machines); other backends rely on step 4.
"""
import contextlib
import fcntl
import importlib.util
import inspect
import threading
import warnings
import zlib
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import TrialState

from sweeps.spec import Sweep
from training.config import ConfigError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
SQLITE_TIMEOUT_S = 120  # a writer waits this long for another process's transaction


class StorageError(ConfigError):
    """The storage URL is malformed, its driver is missing, or the database cannot be reached."""


def _retry_callback(max_retry):
    # Optuna 4.9 renamed RetryFailedTrialCallback / failed_trial_callback; support both spellings.
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
        optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return cls(max_retry=max_retry)


def engine_url(storage: str) -> str:
    """The storage URL with a PostgreSQL driver that is installed: SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, many machines have psycopg2."""
    url = sqlalchemy.engine.make_url(storage)
    if url.drivername == "postgresql":
        for driver, module in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
            if importlib.util.find_spec(module) is not None:
                return url.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)
    return storage


def make_storage(sweep: Sweep) -> optuna.storages.RDBStorage:
    """RDBStorage with heartbeats: a trial whose worker died is failed, then retried (same params)."""
    url = sqlalchemy.engine.make_url(sweep.storage)
    kwargs = {}
    if url.get_backend_name() == "sqlite":
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    callback = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params \
        else "failed_trial_callback"
    kwargs[callback] = _retry_callback(sweep.max_retries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(engine_url(sweep.storage), grace_period=sweep.grace_period,
                                          heartbeat_interval=sweep.heartbeat_interval, **kwargs)


@contextlib.contextmanager
def queue_lock(storage_url: str, study_name: str):
    """Serialise enqueueing and popping among all workers of one study (see module doc)."""
    url = sqlalchemy.engine.make_url(storage_url)
    backend = url.get_backend_name()
    if backend == "sqlite" and url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        with open(f"{url.database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            yield
    elif backend == "postgresql":
        key = zlib.crc32(f"mixerlab-sweep:{study_name}".encode())
        engine = _lock_engine(engine_url(storage_url))
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    else:
        yield


_ENGINES = {}


def _lock_engine(url):
    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    return _ENGINES[url]


_OPEN_ERRORS = (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError, ImportError,
                sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


def shown(storage: str) -> str:
    """The storage URL with its password masked, for messages and logs."""
    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return storage


def _cannot_open(sweep, error) -> str:
    reason = str(getattr(error, "orig", None) or error).strip().splitlines()
    return f"sweep.storage={shown(sweep.storage)!r}: cannot open ({reason[0] if reason else type(error).__name__})"


def open_study(sweep: Sweep, sampler=None, pruner=None) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create the study, or load it; record (first time) or check (later) its train overrides.

    Raises StorageError for a bad URL / unreachable database, ConfigError when the study was made
    with other train settings (results would not be comparable).
    """
    try:
        with queue_lock(sweep.storage, sweep.study_name):
            storage = make_storage(sweep)
            study = optuna.create_study(storage=storage, study_name=sweep.study_name,
                                        direction=sweep.direction, sampler=sampler, pruner=pruner,
                                        load_if_exists=True)
            recorded = study.user_attrs.get("train")
            if recorded is None:
                study.set_user_attr("train", sweep.train)
                study.set_user_attr("sweep", sweep.name)
                study.set_user_attr("description", sweep.description)
                study.set_user_attr("objective", sweep.objective)
    except _OPEN_ERRORS as e:
        raise StorageError(_cannot_open(sweep, e)) from None
    if recorded is not None and list(recorded) != list(sweep.train):
        raise ConfigError(f"sweep.train: study {sweep.study_name!r} was run with train overrides "
                              f"{list(recorded)}, not {sweep.train}; pick another sweep.study_name")
    if study.direction.name.lower() != sweep.direction:
        raise ConfigError(f"sweep.direction={sweep.direction!r}: study {sweep.study_name!r} is "
                         f"{study.direction.name.lower()}")
    return study, storage


def load_existing(sweep: Sweep) -> optuna.Study:
    """The sweep's study for reading (reports); ConfigError when there is none yet."""
    url = sqlalchemy.engine.make_url(sweep.storage)
    missing = (f"sweep.study_name={sweep.study_name!r}: no such study in {shown(sweep.storage)}; "
               "run the sweep first")
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).is_file():
        raise ConfigError(missing)  # (opening it would create an empty database file)
    try:
        return optuna.load_study(study_name=sweep.study_name, storage=engine_url(sweep.storage))
    except KeyError:
        raise ConfigError(missing) from None
    except _OPEN_ERRORS as e:
        raise StorageError(_cannot_open(sweep, e)) from None


def enqueue_missing(study: optuna.Study, sweep: Sweep) -> int:
    """Enqueue every slot the study has no trial for (in any state); returns how many."""
    with queue_lock(sweep.storage, sweep.study_name):
        present = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)}
        missing = [s for s in sweep.slots() if s.key not in present]
        for slot in missing:
            study.enqueue_trial(slot.params, user_attrs={"slot": slot.key, "cell": slot.cell})
    return len(missing)


def fail_stale(study: optuna.Study, sweep: Sweep):
    """Fail the RUNNING trials whose worker stopped beating; the retry callback re-enqueues them."""
    with queue_lock(sweep.storage, sweep.study_name), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def pop(study: optuna.Study, storage: optuna.storages.RDBStorage, sweep: Sweep) -> optuna.Trial | None:
    """Take the oldest WAITING trial (now RUNNING, heartbeat recorded), or None when none waits."""
    with queue_lock(sweep.storage, sweep.study_name):
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if storage.set_trial_state_values(frozen._trial_id, TrialState.RUNNING):
                    storage.record_heartbeat(frozen._trial_id)
                    return optuna.Trial(study, frozen._trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
    return None


def duplicate_of(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of another trial that owns this trial's slot, if any (see module doc, step 4)."""
    slot = trial.user_attrs.get("slot")
    for other in study.get_trials(deepcopy=False):
        if other.number == trial.number or other.user_attrs.get("slot") != slot:
            continue
        if other.state in FINISHED:
            return other.number
        if other.state in (TrialState.RUNNING, TrialState.WAITING) and other.number < trial.number:
            return other.number
    return None


def others_running(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial_id: int, interval: int):
    """Record the trial's heartbeat every `interval` seconds while the body runs."""
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            storage.record_heartbeat(trial_id)

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# -- search inside a cell ------------------------------------------------------------------------
class CellView:
    """The study as seen from one cell: only that cell's trials (everything else is the study's)."""

    def __init__(self, study, cell):
        self._study, self._cell = study, cell

    def __getattr__(self, name):
        return getattr(self._study, name)

    def _filter(self, trials):
        return [t for t in trials if t.user_attrs.get("cell") == self._cell]

    def get_trials(self, *args, **kwargs):
        return self._filter(self._study.get_trials(*args, **kwargs))

    def _get_trials(self, *args, **kwargs):
        return self._filter(self._study._get_trials(*args, **kwargs))

    @property
    def trials(self):
        return self.get_trials()


def _cell_of(trial):
    return trial.user_attrs.get("cell")


class CellSampler(optuna.samplers.BaseSampler):
    """TPE over the searched parameters, learning from the trial's own cell only: the best learning
    rate of a 64-wide model says little about a 512-wide one. Grid parameters are fixed (enqueued)."""

    def __init__(self, seed=None, n_startup_trials=4):
        self._tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        view = CellView(study, _cell_of(trial))
        return self._tpe.sample_independent(view, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._tpe.before_trial(CellView(study, _cell_of(trial)), trial)

    def after_trial(self, study, trial, state, values):
        self._tpe.after_trial(CellView(study, _cell_of(trial)), trial, state, values)


class CellPruner(optuna.pruners.BasePruner):
    """Median pruning against the other trials of the same cell only."""

    def __init__(self, n_startup_trials=2, n_warmup_steps=0):
        self._median = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials,
                                                   n_warmup_steps=n_warmup_steps)

    def prune(self, study, trial):
        return self._median.prune(CellView(study, _cell_of(trial)), trial)


def sampler_and_pruner(sweep: Sweep):
    sampler = CellSampler(seed=sweep.sampler["seed"], n_startup_trials=sweep.sampler["n_startup_trials"])
    pruner = optuna.pruners.NopPruner() if sweep.pruner is None else CellPruner(
        n_startup_trials=sweep.pruner["n_startup_trials"], n_warmup_steps=sweep.pruner["n_warmup_steps"])
    return sampler, pruner
