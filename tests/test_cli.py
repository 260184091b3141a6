"""A user's mistake: one line naming the key, the bad value and what is allowed; exit 2; nothing written."""

import pytest

from tests.conftest import assert_user_error


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
    "distill-preset": (["experiment=mohawk_smoke"], ["stage1", "distill.py"]),
    "missing-checkpoint": (["ckpt_path=/nonexistent.ckpt"], ["ckpt_path", "/nonexistent.ckpt"]),
    "norm": (["model.norm=batchnorm"], ["model.norm='batchnorm'", "rmsnorm, layernorm"]),
    "init": (["model.init=xavier"], ["model.init='xavier'", "mixer, normal"]),
    "weight-decay-on": (["weight_decay_on=norms"], ["weight_decay_on='norms'", "all, matrices"]),
    "curriculum-stage": (["task.curriculum=[{epochs:2,num_kv_pairs:16}]"],
                         ["task.curriculum[0].num_kv_pairs=16", "seq_len=32"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, tmp_path):
    overrides, expected = BAD[case]
    assert_user_error("run.py", overrides, expected, tmp_path / "run")
