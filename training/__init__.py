"""Training: what run.py, sweep.py and distill.py do, as a package the three scripts import.

A package of its own, beside tasks/ and models/ (issue #23): the scripts' work used to live in
run.py, and sweeps/ and distill.py imported that script, private helpers included. Now each script
only calls into here, and nothing imports a script.

    config     composing conf/, ConfigError and the one-line error path (exit status 2)
    files      the checkpoint loader (weights_only=True) and the JSON writer
    lit        LitLM (loss, metrics, optimiser, the captured CUDA-graph step) and the LR schedule
    callbacks  the callbacks of every run (finite loss, throughput, progress bar)
    run        train(cfg): build, check the run dir, train, test, write metrics.json (run.py)
    distill    MOHAWK's stages as LightningModules and distill(cfg) (distill.py)

sweeps/ (sweep.py's) trains its trials through `training.run.train`.
"""
