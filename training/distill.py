"""distill.py's work: MOHAWK (models/mohawk.py) run stage by stage with Lightning, and its report.

`distill(cfg)` trains or loads the teacher, runs the stages on a fresh student (or every variant of
an ablation) and the scratch baseline; `build` checks a config before anything is written. The
stages' LightningModules are here too: `LayerwiseStage` (stages 1 and 2) and `KnowledgeDistillation`
(stage 3: `LitLM` with a KD loss).
"""
import csv
import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import DictConfig, OmegaConf, open_dict

from models.lm import LM
from models.mohawk import check_teacher, hidden_errors, matrix_errors, transfer_weights
from tasks.base import IGNORE
from training import run
from training.config import ConfigError, check_schema, config_errors
from training.files import net_weights, write_json
from training.lit import LitLM, configure_optimizers, scored_logits
from training.schemas import DistillConfig


# -- the teacher ----------------------------------------------------------------------------------
def _checkpoint_of(teacher: str) -> Path:
    """A run.py checkpoint from a .ckpt path or a run dir (its best.ckpt, else last.ckpt)."""
    path = Path(teacher)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise ConfigError(f"teacher={teacher!r}: no checkpoints/best.ckpt or last.ckpt in that run directory")
    if not path.is_file():
        raise ConfigError(f"teacher={teacher!r}: no such checkpoint file or run directory")
    if path.suffix != ".ckpt":
        raise ConfigError(f"teacher={teacher!r}: not a .ckpt file (give a run.py checkpoint or run directory)")
    return path


def load_teacher(teacher: str, weights: bool = True) -> LM:
    """The attention LM of a run.py run: built from the run dir's config.yaml, weights from the
    checkpoint's `net.*` entries (`weights=False` only builds it, to check a configuration)."""
    ckpt = _checkpoint_of(teacher)
    config = ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"teacher={teacher!r}: no config.yaml next to {ckpt.parent} (is it a run.py run?)")
    try:
        net = hydra.utils.instantiate(OmegaConf.load(config).model)
    except Exception as e:
        raise ConfigError(f"teacher={teacher!r}: {config} does not build a model ({str(e).splitlines()[0]})") from e
    if not isinstance(net, LM):
        raise ConfigError(f"teacher={teacher!r}: {config} builds a {type(net).__name__}, not a models.lm.LM")
    try:
        check_teacher(net)
    except ValueError as e:
        raise ConfigError(f"teacher={teacher!r}: not an attention model ({e})") from e
    if weights:
        try:
            net.load_state_dict(net_weights(ckpt))
        except Exception as e:
            raise ConfigError(f"teacher={teacher!r}: cannot load {ckpt} ({str(e).splitlines()[0]})") from e
    return net.eval()


def teacher_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The run.train config of the teacher: this config's task, model, optimiser, ... in run_dir."""
    teacher = OmegaConf.masked_copy(cfg, [k for k in run.CONFIG_KEYS if k in cfg])
    with open_dict(teacher):
        teacher.ckpt_path, teacher.run_dir = None, str(run_dir)
    return teacher


# -- validation -----------------------------------------------------------------------------------
def stage_tokens(cfg: DictConfig, stages: list[int]) -> dict[int, int]:
    """Student tokens of each stage: stages 1 and 2 their own budget, stage 3 what is left of total."""
    tokens = {s: cfg[f"stage{s}"].tokens for s in stages if s != 3}
    if 3 in stages:
        tokens[3] = cfg.total_tokens - sum(tokens.values())
        if tokens[3] <= 0:
            raise ConfigError(f"total_tokens={cfg.total_tokens}: must exceed the stage 1 and 2 budgets "
                              f"({sum(tokens.values())} tokens for stages {stages[:-1]}), stage 3 gets the rest")
    return tokens


def build(cfg: DictConfig):
    """Everything a run needs, validated, before anything is written.

    Returns (datamodule, teacher LM (untrained when it is to be trained here), student factory,
    the list of stage lists to run).
    """
    check_schema(cfg, DistillConfig)
    if cfg.teacher is None:
        _, module = run.build(teacher_config(cfg, Path(".")))
        teacher = module.net
        try:
            check_teacher(teacher)
        except ValueError:
            raise ConfigError(f"model.mixer={cfg.model.mixer!r}: the teacher must be an attention model "
                              "(model=attention), or give a trained one with teacher=<run dir or .ckpt>") from None
    else:
        teacher = load_teacher(str(cfg.teacher), weights=False)
        run.check_trainer(cfg.trainer)
    with config_errors("task"):
        datamodule = hydra.utils.instantiate(cfg.task)
    if teacher.vocab_size != datamodule.vocab_size:
        raise ConfigError(f"task.vocab_size={datamodule.vocab_size}: the teacher has vocab_size={teacher.vocab_size}")
    longest = max([datamodule.task.seq_len, *datamodule.test_tasks])
    if teacher.pos != "none" and teacher.max_seqlen < longest:
        raise ConfigError(f"task.seq_len={longest}: the teacher's positions cover max_seqlen={teacher.max_seqlen}")
    with config_errors("student"):
        make_student = hydra.utils.instantiate(cfg.student)
        make_student(teacher)

    variants = [list(cfg.stages)] if cfg.ablation is None else [list(s) for s in cfg.ablation]
    for stages in variants:
        stage_tokens(cfg, stages)
    for group in ("stage1.optimizer", "stage2.optimizer", "stage3.optimizer"):
        with config_errors(group):
            hydra.utils.instantiate(OmegaConf.select(cfg, group))([torch.nn.Parameter(torch.zeros(1))])
    with config_errors("stage3"):
        KnowledgeDistillation(teacher, teacher, None, temperature=cfg.stage3.temperature,
                              hard_weight=cfg.stage3.hard_weight)
    return datamodule, teacher, make_student, variants


# -- the stages' LightningModules ------------------------------------------------------------
class _FrozenTeacher:
    """Keeps `self.teacher` in eval mode when Lightning switches the module to training."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self


class LayerwiseStage(_FrozenTeacher, L.LightningModule):
    """Stage 1 (matrix orientation) or 2 (hidden-state alignment): the student's mixers, each trained
    against its teacher layer; the rest of the student is untouched.

    Logs `stage{n}/train/loss` (summed over layers), `stage{n}/train/loss@layer=i`, and on validation
    `stage{n}/val/{error}` (the relative error, mean over layers) and `stage{n}/val/{error}@layer=i`,
    with error = matrix_err_rel (stage 1) or hidden_err_rel (stage 2).
    """

    ERRORS = {1: ("matrix_err_rel", matrix_errors), 2: ("hidden_err_rel", hidden_errors)}

    def __init__(self, stage: int, teacher: LM, student: LM, optimizer, scheduler=None):
        super().__init__()
        if stage not in self.ERRORS:
            raise ValueError(f"stage={stage!r}: must be 1 or 2 (stage 3 is KnowledgeDistillation)")
        self.stage = f"stage{stage}"
        self.error, self.errors = self.ERRORS[stage]
        self.teacher = teacher.requires_grad_(False)
        self.student = student
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler

    def training_step(self, batch, batch_idx):
        per_layer = self.errors(self.teacher, self.student, batch["inputs"])
        for i, (loss, _) in enumerate(per_layer):
            self.log(f"{self.stage}/train/loss@layer={i}", loss)
        loss = torch.stack([loss for loss, _ in per_layer]).sum()
        self.log(f"{self.stage}/train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        rel = torch.stack([rel for _, rel in self.errors(self.teacher, self.student, batch["inputs"])])
        n = batch["inputs"].shape[0]
        self.log(f"{self.stage}/val/{self.error}", rel.mean(), batch_size=n)
        for i, r in enumerate(rel):
            self.log(f"{self.stage}/val/{self.error}@layer={i}", r, batch_size=n)

    def configure_optimizers(self):
        mixers = [p for block in self.student.blocks for p in block.mixer.parameters()]
        return configure_optimizers(self, mixers, self.optimizer_factory, self.scheduler_factory)


class KnowledgeDistillation(_FrozenTeacher, LitLM):
    """Stage 3: `LitLM` (same val/test metrics) training `net` on the teacher's output distribution.

    loss = (1 − hard_weight)·τ²·KL(p_teacher^τ ‖ p_student^τ) + hard_weight·CE(student, labels), at
    the scored positions only (elsewhere the teacher's distribution is noise the task never asks
    for); p^τ = softmax(logits / τ), τ = temperature (τ² keeps the gradient's scale independent of τ).
    """

    def __init__(self, net: LM, teacher: LM, optimizer, scheduler=None, temperature: float = 1.0,
                 hard_weight: float = 0.0, weight_decay_on: str = "all"):
        super().__init__(net, optimizer, scheduler, weight_decay_on)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature={temperature!r}: must be a number > 0")
        if not (isinstance(hard_weight, (int, float)) and 0 <= hard_weight <= 1):
            raise ValueError(f"hard_weight={hard_weight!r}: must be a number in [0, 1]")
        self.teacher = teacher.requires_grad_(False)
        self.temperature, self.hard_weight = float(temperature), float(hard_weight)

    def training_step(self, batch, batch_idx):
        inputs, positions, targets = batch["inputs"], batch["positions"], batch["targets"]  # (b, l), (b, S), (b, S)
        valid = (targets != IGNORE).flatten()  # (b·S,)
        logits = scored_logits(self.net, inputs, positions).flatten(0, 1)  # (b·S, V)
        with torch.no_grad():
            target = scored_logits(self.teacher, inputs, positions).flatten(0, 1)
        tau = self.temperature
        kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(target / tau, -1), log_target=True,
                      reduction="none").sum(-1)  # (b·S,)
        kd = (kl * valid).sum() / valid.sum() * tau**2  # the mean over scored positions
        hard = F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE)
        loss = (1 - self.hard_weight) * kd + self.hard_weight * hard
        self.log("train/loss", loss)
        self.log("train/kd", kd)
        self.log("train/ce", hard)
        correct = (logits.argmax(-1) == targets.flatten()) & valid
        self.log("train/acc", correct.sum() / valid.sum())
        return loss


# -- running --------------------------------------------------------------------------------------
def _steps(tokens: int, datamodule) -> int:
    return max(1, math.ceil(tokens / (datamodule.batch_size * datamodule.task.seq_len)))


def _evaluator(cfg) -> L.Trainer:
    """A Trainer from cfg.trainer for validate / test only: no logs, no checkpoints."""
    return hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)


def _trainer(cfg, log_dir: Path, name: str, steps: int) -> L.Trainer:
    """A Trainer from cfg.trainer for exactly `steps` steps (looping over the training set), which
    validates `evals_per_stage` times on the way and logs and checkpoints into log_dir/name."""
    logger = hydra.utils.instantiate(cfg.logger, save_dir=str(log_dir), name=name) if cfg.logger else False
    checkpoint = run.last_checkpoint(log_dir / name / "checkpoints")
    return run.make_trainer(
        cfg.trainer, default_root_dir=str(log_dir / name), logger=logger,
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")],
        max_steps=steps, max_epochs=-1, check_val_every_n_epoch=None,
        val_check_interval=max(1, steps // cfg.evals_per_stage),
    )


def _test(cfg, net: LM, datamodule, prefix: str) -> dict[str, float]:
    """Test metrics of `net` (LitLM's: {prefix}/test/acc, /loss, /exact, ...)."""
    tested = _evaluator(cfg).test(LitLM(net, None), datamodule=datamodule, verbose=False)
    return {f"{prefix}/{k}": float(v) for result in tested for k, v in result.items()}


def _fit(cfg, module, datamodule, log_dir, name, tokens) -> dict[str, float]:
    steps = _steps(tokens, datamodule)
    trainer = _trainer(cfg, log_dir, name, steps)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return {f"{name}/tokens": float(tokens), f"{name}/steps": float(trainer.global_step),
            f"{name}/seconds": time.perf_counter() - start}


def run_stages(cfg, teacher: LM, student: LM, stages: list[int], datamodule, log_dir: Path) -> dict[str, float]:
    """The MOHAWK stages in `stages`, in order, on `student` (trained in place); returns metrics."""
    metrics = {}
    tokens = stage_tokens(cfg, stages)
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.scheduler is not None else None
    for stage in stages:
        optimizer = hydra.utils.instantiate(cfg[f"stage{stage}"].optimizer)
        print(f"stage {stage}: {tokens[stage]} tokens", flush=True)
        if stage in (1, 2):
            module = LayerwiseStage(stage, teacher, student, optimizer, scheduler)
            error = f"stage{stage}/val/{module.error}"
            validate = lambda: _evaluator(cfg).validate(module, datamodule=datamodule, verbose=False)[0]
            metrics[f"stage{stage}/{module.error}/initial"] = validate()[error]
            metrics.update(_fit(cfg, module, datamodule, log_dir, f"stage{stage}", tokens[stage]))
            metrics[f"stage{stage}/{module.error}/final"] = validate()[error]
        else:
            transfer_weights(teacher, student)
            module = KnowledgeDistillation(student, teacher, optimizer, scheduler, cfg.stage3.temperature,
                                           cfg.stage3.hard_weight, cfg.weight_decay_on)
            metrics.update(_fit(cfg, module, datamodule, log_dir, "stage3", tokens[stage]))
    metrics.update(_test(cfg, student, datamodule, "student"))
    return metrics


def distill(cfg: DictConfig) -> dict[str, float]:
    """Train or load the teacher, run the stages (or every ablation variant) and the scratch baseline.

    Returns flat metrics, also written to <run dir>/metrics.json.
    """
    datamodule, _, make_student, variants = build(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    print(f"run dir: {run_dir.resolve()}", flush=True)

    teacher_path = cfg.teacher
    if teacher_path is None:
        run.train(teacher_config(cfg, run_dir / "teacher"))
        teacher_path = run_dir / "teacher"
    teacher = load_teacher(str(teacher_path))
    datamodule.setup()
    metrics = _test(cfg, teacher, datamodule, "teacher")

    for stages in variants:
        log_dir = run_dir if cfg.ablation is None else run_dir / variant_name(stages)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        variant = run_stages(cfg, teacher, make_student(teacher), stages, datamodule, log_dir)
        if cfg.ablation is None:
            metrics.update(variant)
        else:
            log_dir.mkdir(parents=True, exist_ok=True)
            write_json(log_dir / "metrics.json", variant)
            metrics.update({f"{variant_name(stages)}/{k}": v for k, v in variant.items()})
    if cfg.scratch:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        student = make_student(teacher)
        optimizer = hydra.utils.instantiate(cfg.optimizer)
        scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.scheduler is not None else None
        metrics.update(_fit(cfg, LitLM(student, optimizer, scheduler, cfg.weight_decay_on), datamodule, run_dir, "scratch",
                            cfg.total_tokens))
        metrics.update(_test(cfg, student, datamodule, "scratch"))

    write_json(run_dir / "metrics.json", metrics)
    if cfg.ablation is not None:
        write_report(metrics, [variant_name(s) for s in variants], run_dir)
    for key in ("teacher/test/acc", "student/test/acc", "scratch/test/acc"):
        if key in metrics:
            print(f"{key} {metrics[key]:.4f}", flush=True)
    print(f"-> {run_dir / 'metrics.json'}", flush=True)
    return metrics


# -- the ablation report --------------------------------------------------------------------------
def variant_name(stages) -> str:
    return "stages-" + "-".join(str(s) for s in stages)


def _fmt(metrics, key, digits=3):
    return f"{metrics[key]:.{digits}f}" if key in metrics else ""


def write_report(metrics: dict[str, float], variants: list[str], run_dir: Path) -> str:
    """ablation.md (a markdown table) and ablation.csv from an ablation run's metrics; returns the table."""
    header = ["run", "student tokens (1 / 2 / 3)", "matrix err rel (initial → final)",
              "hidden err rel (initial → final)", "test acc"]
    rows = [["teacher (attention)", "", "", "", _fmt(metrics, "teacher/test/acc")]]
    if "scratch/test/acc" in metrics:
        rows.append(["scratch (same student)", f"{int(metrics['scratch/tokens'])}", "", "",
                     _fmt(metrics, "scratch/test/acc")])
    for v in variants:
        m = {k.removeprefix(v + "/"): x for k, x in metrics.items() if k.startswith(v + "/")}
        tokens = " / ".join(str(int(m[f"stage{s}/tokens"])) if f"stage{s}/tokens" in m else "0" for s in (1, 2, 3))
        errors = [f"{_fmt(m, f'{k}/initial')} → {_fmt(m, f'{k}/final')}" if f"{k}/final" in m else ""
                  for k in ("stage1/matrix_err_rel", "stage2/hidden_err_rel")]
        rows.append([f"MOHAWK {v.removeprefix('stages-').replace('-', '+')}", tokens, *errors,
                     _fmt(m, "student/test/acc")])
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows]) + "\n"
    (run_dir / "ablation.md").write_text(table)
    with open(run_dir / "ablation.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    print(table, flush=True)
    return table


def main(cfg: DictConfig) -> None:
    """`python distill.py ...` inside Hydra's app. A ConfigError here is one the pre-flight check
    did not see (Hydra's flags skip it) or a teacher that fails to load; Diverged, the teacher's
    training (run.train)."""
    with run.one_line_errors():
        distill(cfg)
