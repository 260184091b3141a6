"""The README's commands run as written: a README edit that breaks one fails here.

Every ```bash block is run by bash with `python`, `pip`, `tensorboard` and `optuna-dashboard`
replaced by functions that only record their arguments, so the test sees each `python <script> ...`
exactly as the shell would pass it (variables, loops and quoting included). Then, in a scratch
directory, every run.py / sweep.py / distill.py command is checked the way the script checks it
before it starts (composed, resumed, built: `check_command`), without training. The rules:

- A command whose comment says "(GPU" needs a GPU. On a machine without one, it must pass the check
  (it trains nothing, like action=report) or fail it with the one line that says to add
  trainer=cpu; it is then checked with trainer=cpu added.
- A run.py command whose run dir a later command resumes (`ckpt_path=...`) is run for real, shrunk
  (SHRINK appended), so that the resume has a run to continue.
- A `<placeholder>` is filled from PLACEHOLDERS; `<date>` is a tiny attention run made here.
- A database URL is not opened: sweep.py opens its storage only when it runs trials, after the check.

The plain (unlabelled) blocks that show `$ python ...` followed by `error: <message>...` are run
too, and must print that message. The README's "Adding a task" files are added to a copy of the
repository, where the task contract tests must find and pass the new task.
"""
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sweep
from training import distill, run

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SCRIPTS = {"run.py": lambda argv: run.check_command(argv),
           "sweep.py": lambda argv: sweep.check_command(argv),
           "distill.py": lambda argv: run.check_command(argv, "distill", check=distill.build)}
SHRINK = ["task.num_train=128", "task.num_val=32", "task.num_test=32"]
TEACHER = "runs/mqar-attention/2026-01-01_00-00-00"
PLACEHOLDERS = {"<date>": TEACHER.rsplit("/", 1)[1]}
GPU = torch.cuda.is_available()

RECORD = r"""
python() { printf '%s\0' "$LINE" "$#" "$@" >> "$LOG"; }
pip() { :; }
tensorboard() { :; }
optuna-dashboard() { :; }
"""


def commands(block: str, scratch: Path) -> list[tuple[str, list[str]]]:
    """(the README line, argv) of every `python <script>` that `block` runs, in order, once each."""
    unknown = set(re.findall(r"<[a-z][^<>]*>", block)) - PLACEHOLDERS.keys()
    assert not unknown, f"the README uses {unknown}: teach this test what to put there"
    for placeholder, value in PLACEHOLDERS.items():
        block = block.replace(placeholder, value)
    lines = block.strip().splitlines()
    script = RECORD + "\n".join(f"LINE={i}; {line}" for i, line in enumerate(lines))
    log = scratch / "argv.log"
    log.unlink(missing_ok=True)
    subprocess.run(["bash", "-c", script], cwd=scratch, env={"LOG": str(log), "PATH": "/usr/bin:/bin"},
                   check=True, timeout=60)
    fields = log.read_bytes().decode().split("\0")[:-1] if log.exists() else []
    found = []
    while fields:
        line, n, fields = int(fields[0]), int(fields[1]), fields[2:]
        argv, fields = fields[:n], fields[n:]
        if argv and argv[0] in SCRIPTS and (lines[line], argv) not in found:
            found.append((lines[line], argv))
    return found


def _run_dir(argv):
    return next((a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")), None)


def check(line: str, argv: list[str]) -> None:
    script, args = argv[0], argv[1:]
    if "(GPU" in line and not GPU:
        try:
            SCRIPTS[script](args)
        except run.ConfigError as e:
            assert "add trainer=cpu" in str(e), str(e)
        args = [*args, "trainer=cpu"]
    try:
        SCRIPTS[script](args)
    except run.ConfigError as e:
        pytest.fail(f"README: `{line.strip()}` -> error: {e}")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """An empty directory to run the README's commands in."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_the_readme_has_commands_for_every_script():
    found = {word for block in BLOCKS for word in re.findall(r"python (\w+\.py)", block)}
    assert found == SCRIPTS.keys()


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_every_readme_command_composes_and_builds(block, scratch):
    if "<date>" in block:  # the teacher that distill.py's line names
        run.train(run.compose(["model=attention", *SHRINK, "trainer.max_epochs=1", f"run_dir={scratch / TEACHER}"]))
    found = commands(block, scratch)
    for i, (line, argv) in enumerate(found):
        check(line, argv)
        run_dir = _run_dir(argv)
        resumed_later = run_dir and any(_run_dir(a) == run_dir and any(x.startswith("ckpt_path=") for x in a)
                                        for _, a in found[i + 1:])
        if argv[0] == "run.py" and resumed_later and not any(a.startswith("ckpt_path=") for a in argv):
            run.train(run.command_config([*argv[1:], *SHRINK]))


def test_the_readme_errors_are_what_the_scripts_print():
    shown = re.findall(r"^\$ python (\S+) (.*)\n(error: .*?)(?:\.\.\.)?$", README, re.M)
    assert shown
    for script, args, message in shown:
        with pytest.raises(run.ConfigError) as error:
            SCRIPTS[script](shlex.split(args))
        assert f"error: {error.value}".startswith(message), (message, str(error.value))


def test_adding_a_task_as_the_readme_says(tmp_path):
    """The README's `reverse` task, added to a copy of the repository, is found and passes the task
    contract tests, and `python run.py task=reverse model=mamba2` builds."""
    passed = _add_readme_files_and_test(tmp_path, r"tasks/\w+\.py|conf/task/\w+\.yaml",
                                        ["conf/task/reverse.yaml", "tasks/reverse.py"],
                                        ["tests/test_tasks.py", "-k", "reverse"], ["task=reverse", "model=mamba2"])
    assert passed >= 2


def test_adding_a_mixer_as_the_readme_says(tmp_path):
    """The README's `ema` mixer, added to a copy of the repository, is found and passes the mixer
    contract tests, and `python run.py model=ema` builds."""
    passed = _add_readme_files_and_test(tmp_path, r"models/mixers/\w+\.py|conf/model/\w+\.yaml",
                                        ["conf/model/ema.yaml", "models/mixers/ema.py"],
                                        ["tests/test_mixers.py", "-k", "ema"], ["model=ema"])
    assert passed >= 10


def _add_readme_files_and_test(tmp_path, paths: str, expected: list[str], pytest_args: list[str],
                               overrides: list[str]) -> int:
    """Add the README's files whose first line names a path matching `paths` (exactly `expected`)
    to a copy of the repository; there `pytest pytest_args` must pass and run.py with `overrides`
    build. Returns how many tests passed."""
    files = re.findall(rf"```\w+\n# ({paths})[^\n]*\n(.*?)```", README, re.S)
    assert sorted(path for path, _ in files) == expected
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "runs", "__pycache__", ".pytest_cache"))
    for path, text in files:
        (repo / path).write_text(text)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                           cwd=repo, capture_output=True, text=True, timeout=300)
    passed = re.search(r"\b(\d+) passed", tests.stdout)
    assert tests.returncode == 0 and passed, tests.stdout + tests.stderr
    built = subprocess.run([sys.executable, "-c", f"from training import run; run.check_command({overrides!r})"],
                           cwd=repo, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    return int(passed.group(1))


def test_the_readme_sections_and_files_that_configs_and_code_name_exist():
    """`README "Presets"` in a config comment or a docstring names a heading of the README (or the
    start of one); `PAPERS.md` names a file of the repository (or of the folder that names it)."""
    headings = re.findall(r"^#+ (.+)$", README, re.M)
    # The project's own files: not a virtual environment or other hidden folder inside the checkout.
    sources = [p for p in [*ROOT.glob("conf/**/*.yaml"), *ROOT.glob("*.py"), *ROOT.glob("*/**/*.py")]
               if "tests" not in p.parts and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    named = 0
    for path in sources:
        text = path.read_text()
        for match in re.finditer(r'README(?:\.md)?,? "([^"]+)"(?:, "([^"]+)")?', text):
            for section in filter(None, match.groups()):
                named += 1
                assert any(h.startswith(section) for h in headings), f"{path}: README has no section {section!r}"
        for name in re.findall(r"(?<![\w/.-])((?:[\w.-]+/)*[A-Z][A-Z_]+\.md)\b", text):
            assert (ROOT / name).is_file() or (path.parent / name).is_file(), f"{path}: names {name}, which does not exist"
    assert named
