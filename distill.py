"""MOHAWK: distil an attention model into a Mamba-2 model of the same depth (models/mohawk.py).

    python distill.py task=mqar teacher=runs/mqar-attention/<date>      # a run.py run dir or .ckpt
    python distill.py experiment=mohawk_smoke                            # tiny, CPU, minutes
    python distill.py experiment=mohawk_smoke 'ablation=[[3],[2,3],[1,2,3]]'
    python distill.py student=discrete stages=[2,3] total_tokens=4000000

Without `teacher`, the teacher (`model`, an attention config) is trained first with run.train into
<run dir>/teacher. Then the stages in `stages` run in order on the teacher and a fresh student,
and the same student is trained from scratch (`scratch`) on the same `total_tokens`. Stage 3 gets
the tokens that stages 1 and 2 leave, so every choice of stages costs the same number of student
tokens. With `ablation` (a list of stage lists), each runs into <run dir>/stages-<s>/ on the same
teacher and the run writes ablation.md and ablation.csv.

The run dir holds config.yaml, TensorBoard events per stage (stage1/, stage2/, stage3/, scratch/,
teacher/), checkpoints and metrics.json. A mistake in the configuration is reported in one line
with exit status 2, before anything is written. The work is training.distill's.
"""
import sys

import hydra
from omegaconf import DictConfig

from training import distill, run


@hydra.main(config_path="conf", config_name="distill", version_base="1.3")
def main(cfg: DictConfig) -> None:
    distill.main(cfg)


if __name__ == "__main__":
    run.preflight(sys.argv[1:], config_name="distill", check=distill.build)
    main()
