"""A user's mistake: one line naming the key, the bad value and what is allowed; exit 2; nothing written."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BAD = {
    "unknown-task": (["task=foo"], ["task=foo", "mqar"]),
    "unknown-model": (["model=mamba3"], ["model=mamba3", "mamba2"]),
    "unknown-key": (["task.seqlen=128"], ["task.seqlen", "seq_len"]),
    "non-numeric": (["model.d_state=abc"], ["model.d_state", "abc", "positive integer"]),
    "non-positive": (["task.seq_len=0"], ["task.seq_len", "0"]),
    "kv-pairs-dont-fit": (["task.num_kv_pairs=40"], ["task.num_kv_pairs", "40", "seq_len"]),
    "headdim": (["model.headdim=48"], ["model.headdim", "48"]),
    "n-heads": (["model=attention", "model.n_heads=3"], ["model.n_heads", "3", "d_model"]),
    "vocab-too-small": (["task.vocab_size=32"], ["task.vocab_size", "32"]),
    "missing-checkpoint": (["ckpt_path=/nonexistent.ckpt"], ["ckpt_path", "/nonexistent.ckpt"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, tmp_path):
    overrides, expected = BAD[case]
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run.py", *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in expected:
        assert word in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not run_dir.exists(), "a failed run must leave nothing behind"
