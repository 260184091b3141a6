"""The default recipe learns MQAR at Zoology's vocabulary (V=8192) on a CPU, with every mixer.

These are the CPU default jobs (`python run.py model=M task.vocab_size=8192`) under a step budget.
Before the recipe followed the reference code (above all, the LM head was untied) the Mamba-2 job
stayed at chance at V=8192 (val/acc 0.001, 0.000, 0.002, 0.001 over 4 epochs) while V=64 reached 0.99 in 3;
README "Recipe" has the measurements for each choice.
"""
import pytest

from training import run

# Optimiser steps (313 an epoch) within which each default must reach 0.99 val accuracy at V=8192,
# on its own schedule (trainer.max_steps would shorten the cosine decay: attention then stopped at
# 0.975 within 1,900 steps). Attention took 1,565 steps; the Mamba models, on their recipe (fresh data,
# beta2 0.98; README "CPU defaults"), 1,565 (Mamba-2; 1,878 on one thread) and 4,382 (Mamba-1). On
# Zoology's recipe Mamba-2 took 2,817 and Mamba-1 memorised the fixed training set (val/acc 0.95 after
# 10 epochs): both fail here. Each run stops at 0.99, so a passing run costs what the model needs.
BUDGET = {"attention": 1900, "mamba1": 5100, "mamba2": 2300}


@pytest.mark.parametrize("model", BUDGET)
def test_large_vocabulary_mqar_learns(model, tmp_path):
    cfg = run.compose([f"model={model}", "task.vocab_size=8192", "trainer.accelerator=cpu",
                       "trainer.enable_progress_bar=false", f"run_dir={tmp_path}"])
    metrics = run.train(cfg)
    # Chance is 1/4096 (values are half the vocabulary); 1/K = 0.25 is a model that outputs some value
    # seen in the context. The run stops once val/acc reaches 0.99; the test set confirms it.
    assert metrics["val/acc_best"] >= 0.99 and metrics["train/steps"] <= BUDGET[model], metrics
    assert metrics["test/acc"] >= 0.98, metrics
