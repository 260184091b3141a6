import subprocess
import sys
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def assert_user_error(script: str, overrides: list[str], expected: list[str], run_dir) -> None:
    """`python script overrides` fails as a user's mistake must: exit 2, one `error: ` line on stderr
    holding every word of `expected`, no traceback, and nothing written to run_dir."""
    proc = subprocess.run([sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in expected:
        assert word in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not Path(run_dir).exists(), "a failed run must leave nothing behind"
