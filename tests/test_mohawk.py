"""MOHAWK: materialised mixer matrices, the discrete Mamba-2, each stage's loss, weight transfer,
and distill.py end to end (artefacts, ablation report, one-line errors)."""
import copy
import json
from pathlib import Path

import pytest

from tests.conftest import assert_rel_close, assert_user_error
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from kernels.ssd import ssd_scan
from models.lm import LM
from models.mamba2_discrete import DiscreteMamba2
from models.mixers.attention import Attention
from models.mixers.mamba2 import Mamba2
from tasks.data import scored
from models.mohawk import block_inputs, block_with_mixer, hidden_errors, make_student, matrix_errors, transfer_weights
from training import distill, run
from training.callbacks import ProgressBar
from training.distill import KnowledgeDistillation

ROOT = Path(__file__).resolve().parents[1]

D_MODEL, BATCH, SEQLEN = 16, 2, 11
VOCAB = 16


def inputs(seqlen=SEQLEN, seed=1):
    return torch.randn(BATCH, seqlen, D_MODEL, generator=torch.Generator().manual_seed(seed))


def ids(seqlen=SEQLEN, seed=1, batch=BATCH):
    return torch.randint(VOCAB, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def teacher_lm(**overrides):
    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, d_model=D_MODEL, n_layers=2, mixer="attention", pos="learned", max_seqlen=16,
                  n_heads=2)
    return LM(**{**kwargs, **overrides}).eval()


# -- materialisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("pos", ["none", "rope"])
def test_attention_matrix_reproduces_forward(pos):
    torch.manual_seed(0)
    attn = Attention(D_MODEL, n_heads=2, pos=pos, max_seqlen=16)
    x = inputs()
    A = attn.attention_matrix(x)  # (b, h, l, l)
    assert A.shape == (BATCH, 2, SEQLEN, SEQLEN)
    assert torch.allclose(A.sum(-1), torch.ones(BATCH, 2, SEQLEN))
    assert (A.triu(1) == 0).all()
    v = attn.qkv(x).view(BATCH, SEQLEN, 3, 2, D_MODEL // 2)[:, :, 2]  # (b, l, h, hd)
    y = torch.einsum("bhts,bshp->bthp", A, v).flatten(-2)
    assert_rel_close(attn.out_proj(y), attn(x))


MAMBAS = {
    "mamba2-G2-H4": lambda: Mamba2(D_MODEL, d_state=8, expand=2, headdim=8, ngroups=2, chunk_size=4),
    "mamba2-G4-H4": lambda: Mamba2(D_MODEL, d_state=8, expand=1, headdim=4, ngroups=4, chunk_size=4),
    "discrete-H2": lambda: DiscreteMamba2(D_MODEL, nheads=2, d_state=8, chunk_size=4),
}


def _trained_like(mixer):
    """Move every parameter off its special init, so the test covers a trained conv, gate and D."""
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mixer


@pytest.mark.parametrize("name", list(MAMBAS))
def test_ssd_matrix_applied_to_input_is_the_scan(name):
    torch.manual_seed(0)
    mixer = _trained_like(MAMBAS[name]())
    u = inputs()
    z, x, dt, A, B, C = mixer.ssd_inputs(u)
    M = mixer.ssd_matrix(u)
    assert M.shape == (BATCH, mixer.nheads, SEQLEN, SEQLEN)
    assert (M.triu(1) == 0).all(), "causal: no token reads a later one"
    y = torch.einsum("bhts,bshp->bthp", M, x)  # (b, l, H, P)
    if isinstance(mixer, DiscreteMamba2):
        # No Δ on the input: the scan of x/Δ is the discrete recurrence of x.
        scan = ssd_scan(x / dt[..., None], dt, A, B, C, mixer.chunk_size) + mixer.D[:, None] * x
        out = mixer.out_proj(y.flatten(-2) * F.silu(z + mixer.z_bias))
    else:
        scan = ssd_scan(x, dt, A, B, C, mixer.chunk_size, D=mixer.D)
        out = mixer.out_proj(mixer.norm(y.flatten(-2), z))
    assert_rel_close(y, scan)
    assert_rel_close(out, mixer(u))  # M·x, through the rest of the block, is the mixer's output


def test_ssd_matrix_formula_on_one_entry():
    torch.manual_seed(0)
    mixer = _trained_like(Mamba2(D_MODEL, d_state=8, expand=2, headdim=8, ngroups=2, chunk_size=4))
    _, _, dt, A, B, C = mixer.ssd_inputs(inputs())
    M = mixer.ssd_matrix(inputs())
    b, h, t, s = 1, 3, 9, 4  # head 3 reads group 1
    expected = (C[b, t, 1] @ B[b, s, 1]) * dt[b, s, h] * torch.exp(A[h] * dt[b, s + 1 : t + 1, h].sum())
    assert torch.allclose(M[b, h, t, s], expected, rtol=1e-5)
    assert torch.allclose(M[b, h, t, t], C[b, t, 1] @ B[b, t, 1] * dt[b, t, h] + mixer.D[h], rtol=1e-5)


# -- the discrete Mamba-2 -------------------------------------------------------------------------
def test_discrete_init_is_attention_shaped():
    torch.manual_seed(0)
    mixer = DiscreteMamba2(D_MODEL, nheads=2, d_state=8)
    u = inputs()
    z, x, dt, A, B, C = mixer.ssd_inputs(u)
    _, x_proj, B_proj, C_proj, _ = mixer.in_proj(u).split([D_MODEL, D_MODEL, 16, 16, 2], dim=-1)  # z, x, B, C, dt
    # Identity conv, no activation: x, B, C are the current token's projections (V, K, Q).
    assert torch.allclose(x.flatten(-2), x_proj) and torch.allclose(B.flatten(-2), B_proj)
    assert torch.allclose(C.flatten(-2), C_proj)
    assert torch.allclose(F.silu(z + mixer.z_bias), torch.ones_like(z)), "the gate starts at 1"
    assert mixer.ngroups == mixer.nheads == 2 and not hasattr(mixer, "norm")


def test_discrete_mixer_contract():
    torch.manual_seed(0)
    mixer = _trained_like(DiscreteMamba2(D_MODEL, nheads=2, d_state=8, chunk_size=4)).eval()
    u = inputs()
    with torch.no_grad():
        y = mixer(u)
        cache = mixer.allocate_cache(BATCH, SEQLEN)
        stepped = torch.stack([mixer.step(u[:, t], cache) for t in range(SEQLEN)], dim=1)
        cache = mixer.allocate_cache(BATCH, SEQLEN)
        chunked = torch.cat([mixer(part, cache) for part in u.split([3, 1, 7], dim=1)], dim=1)
        u2 = u.clone()
        u2[:, 6] += 1.0
        later = mixer(u2)
    assert_rel_close(stepped, y)
    assert_rel_close(chunked, y)
    assert torch.equal(later[:, :6], y[:, :6]) and not torch.allclose(later[:, 6:], y[:, 6:])
    mixer(u).square().sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_discrete_validation():
    with pytest.raises(ValueError, match="nheads=3"):
        DiscreteMamba2(D_MODEL, nheads=3)
    with pytest.raises(ValueError, match="nheads=0"):
        DiscreteMamba2(D_MODEL, nheads=0)


# -- the student and weight transfer --------------------------------------------------------------
@pytest.mark.parametrize("mixer", ["mamba2", "discrete"])
def test_make_student_matches_teacher_heads(mixer):
    teacher = teacher_lm(mlp_expand=2, n_heads=4)
    student = make_student(teacher, mixer=mixer, expand=2)
    for block in student.blocks:
        m = block.mixer
        assert isinstance(m, DiscreteMamba2 if mixer == "discrete" else Mamba2)
        assert m.nheads == m.ngroups == 4 and m.d_state == D_MODEL // 4 and m.headdim == 2 * D_MODEL // 4
    assert student.pos == "learned" and student.blocks[0].mlp is not None and len(student.blocks) == 2
    assert student(ids()).shape == (BATCH, SEQLEN, VOCAB)


def test_make_student_validation():
    with pytest.raises(ValueError, match="mixer='mamba3'"):
        make_student(teacher_lm(), mixer="mamba3")
    with pytest.raises(ValueError, match="expand=0"):
        make_student(teacher_lm(), expand=0)
    with pytest.raises(ValueError, match="attention"):
        make_student(LM(VOCAB, D_MODEL, 2, mixer="mamba2", headdim=8))
    assert make_student(teacher_lm(pos="rope")).pos == "none"


def test_transfer_weights_copies_everything_but_the_mixers():
    teacher = teacher_lm(mlp_expand=2)
    student = make_student(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    copied = transfer_weights(teacher, student)
    assert {"embedding.weight", "pos_emb.weight", "norm_f.weight", "head.weight", "blocks.1.mlp.fc2.bias",
            "blocks.0.norm.weight", "blocks.0.mlp_norm.weight"} <= set(copied)
    t_state = teacher.state_dict()
    for k, v in student.state_dict().items():
        expected = before[k] if ".mixer." in k else t_state[k]
        assert torch.equal(v, expected), k


# -- each stage's loss on a tiny model ------------------------------------------------------------
def _train(params, loss_fn, steps, lr=1e-2):
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mixer", ["mamba2", "discrete"])
def test_stage1_matrix_loss_trains_only_the_mixers(mixer):
    teacher, x = teacher_lm(), ids(batch=4)
    student = make_student(teacher, mixer=mixer)
    per_layer = matrix_errors(teacher, student, x)
    assert len(per_layer) == 2
    sum(loss for loss, _ in per_layer).backward()
    for name, p in student.named_parameters():
        if ".mixer." not in name:
            assert p.grad is None, name
    assert all(p.grad is None for p in teacher.parameters())
    mixers = [p for b in student.blocks for p in b.mixer.parameters()]
    losses = _train(mixers, lambda: sum(loss for loss, _ in matrix_errors(teacher, student, x)), steps=20)
    assert losses[-1] < 0.8 * losses[0], losses
    # The relative error is ‖A − M‖_F / ‖A‖_F, so it is 0 for M = A, and the loss scales with it.
    rel = matrix_errors(teacher, student, x)[0][1]
    assert 0 < rel < 10


def test_block_with_mixer_is_the_block():
    teacher = teacher_lm(mlp_expand=2)
    x = block_inputs(teacher, ids())[1]
    block = teacher.blocks[1]
    assert torch.allclose(block_with_mixer(block, block.mixer, x), block(x))


def test_block_inputs_are_the_residual_stream():
    teacher = teacher_lm()
    x = ids()
    xs = block_inputs(teacher, x)
    assert len(xs) == 2 and torch.allclose(teacher.blocks[0](xs[0]), xs[1])
    assert torch.allclose(teacher.norm_f(teacher.blocks[1](xs[1])), teacher.hidden(x))


@pytest.mark.parametrize("mixer", ["mamba2", "discrete"])
def test_stage2_hidden_loss_trains_only_the_mixers(mixer):
    teacher, x = teacher_lm(mlp_expand=2), ids(batch=4)
    student = make_student(teacher, mixer=mixer)
    sum(loss for loss, _ in hidden_errors(teacher, student, x)).backward()
    for name, p in student.named_parameters():
        assert (p.grad is not None) == (".mixer." in name), name
    mixers = [p for b in student.blocks for p in b.mixer.parameters()]
    losses = _train(mixers, lambda: sum(loss for loss, _ in hidden_errors(teacher, student, x)), steps=12, lr=3e-3)
    assert losses[-1] < 0.5 * losses[0], losses


def test_stage3_kd_loss():
    teacher, x = teacher_lm(), ids(batch=4, seqlen=12)
    labels = torch.full_like(x, -100)
    labels[:, 6:] = x[:, :6]  # some scored positions
    batch = {"inputs": x, "labels": labels, **dict(zip(("positions", "targets"), scored(labels)))}
    # A copy of the teacher has nothing left to learn: KL = 0, whatever the temperature.
    same = KnowledgeDistillation(copy.deepcopy(teacher), teacher, None, temperature=2.0)
    same.log = lambda *a, **k: None
    assert same.training_step(batch, 0).abs() < 1e-6
    student = make_student(teacher)
    transfer_weights(teacher, student)
    kd = KnowledgeDistillation(student, teacher, None, temperature=2.0, hard_weight=0.5)
    kd.log = lambda *a, **k: None
    losses = _train(list(student.parameters()), lambda: kd.training_step(batch, 0), steps=20)
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(p.grad is None for p in teacher.parameters())
    for bad, match in [(dict(temperature=0), "temperature=0"), (dict(hard_weight=2), "hard_weight=2")]:
        with pytest.raises(ValueError, match=match):
            KnowledgeDistillation(student, teacher, None, **bad)


# -- distill.py end to end ------------------------------------------------------------------------
TINY = ["task.vocab_size=32", "task.seq_len=16", "task.num_kv_pairs=2", "task.num_train=256", "task.num_val=64",
        "task.num_test=64", "task.batch_size=32", "model.d_model=16", "model.n_heads=2",
        "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.log_every_n_steps=1", "trainer.max_epochs=1", "target_acc=null", "evals_per_stage=1",
        "total_tokens=4096", "stage1.tokens=1024", "stage2.tokens=1024"]  # 2 + 2 + 4 steps of 32 x 16 tokens


def tiny(run_dir, *overrides):
    return run.compose([*TINY, f"run_dir={run_dir}", *overrides], config_name="distill")


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A full run: the teacher trained first, stages 1, 2, 3, and scratch. Returns the run dir, the
    metrics and the stages' trainers."""
    run_dir, trainers = tmp_path_factory.mktemp("distill"), []
    make_trainer = distill._trainer

    def kept_trainer(*args, **kwargs):
        trainers.append(make_trainer(*args, **kwargs))
        return trainers[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(distill, "_trainer", kept_trainer)
        return run_dir, distill.distill(tiny(run_dir)), trainers


def test_distill_writes_metrics_and_logs(distilled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, metrics, _ = distilled
    keys = {"teacher/test/acc", "stage1/matrix_err_rel/initial", "stage1/matrix_err_rel/final",
            "stage2/hidden_err_rel/initial", "stage2/hidden_err_rel/final", "student/test/acc", "scratch/test/acc"}
    assert keys <= metrics.keys()
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(metrics)
    assert metrics["stage1/steps"] == metrics["stage2/steps"] == 2 and metrics["stage3/steps"] == 4
    assert metrics["scratch/steps"] == 8, "scratch trains on the same total tokens"
    assert (run_dir / "teacher" / "checkpoints" / "best.ckpt").is_file() and (run_dir / "config.yaml").is_file()
    for stage, tag in [("stage1", "stage1/train/loss"), ("stage2", "stage2/val/hidden_err_rel"),
                       ("stage3", "train/loss"), ("scratch", "train/loss")]:
        assert tag in EventAccumulator(str(run_dir / stage)).Reload().Tags()["scalars"], stage
        assert (run_dir / stage / "checkpoints" / "last.ckpt").is_file()


def test_stages_leave_their_losses_on_the_device(distilled):
    """No `prog_bar` metrics, which Lightning reads to the host after every step (a wait for the GPU
    each step); the progress bar shows the logged losses at its redraws."""
    trainers = distilled[2]
    assert [Path(t.default_root_dir).name for t in trainers] == ["stage1", "stage2", "stage3", "scratch"]
    for trainer in trainers:
        assert trainer.logged_metrics and not trainer.progress_bar_metrics, trainer.progress_bar_metrics
    shown = ProgressBar().get_metrics(trainers[0], None)
    assert shown["stage1/train/loss"] == float(trainers[0].logged_metrics["stage1/train/loss"])


def test_ablation_reuses_a_teacher_and_writes_the_table(distilled, tmp_path):
    teacher_dir = distilled[0] / "teacher"
    metrics = distill.distill(tiny(tmp_path, f"teacher={teacher_dir}", "ablation=[[3],[2,3]]",
                                   "student=discrete"))
    assert not (tmp_path / "teacher").exists()
    assert metrics["teacher/test/acc"] == pytest.approx(distilled[1]["teacher/test/acc"])
    # Fixed total: stage 3 gets what stage 2 leaves.
    assert metrics["stages-3/stage3/steps"] == 8 and metrics["stages-2-3/stage3/steps"] == 6
    assert "stages-2-3/stage2/hidden_err_rel/final" in metrics and "stages-3/stage2/tokens" not in metrics
    for variant in ("stages-3", "stages-2-3"):
        assert "student/test/acc" in json.loads((tmp_path / variant / "metrics.json").read_text())
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[-1].startswith("| MOHAWK 2+3 |")
    assert (tmp_path / "ablation.csv").read_text().count("\n") == 5


def test_teacher_checkpoint_is_loaded(distilled):
    run_dir = distilled[0] / "teacher"
    teacher = distill.load_teacher(str(run_dir / "checkpoints" / "last.ckpt"))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(teacher.head.weight, state["net.head.weight"])


def _mamba_run(tmp_path):
    """A run dir whose config is a Mamba-2 model (the checkpoint need not load: the config is checked first)."""
    run_dir = tmp_path / "mamba"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "best.ckpt").write_bytes(b"")
    model = run.compose(["model=mamba2"]).model
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml({"model": OmegaConf.to_container(model, resolve=True)}))
    return run_dir


BAD = {
    "missing-teacher": (["teacher=/nonexistent/run"], ["teacher=", "/nonexistent/run", "no such"]),
    "mamba-teacher": (["teacher={mamba}"], ["teacher=", "not an attention model"]),
    "teacher-model": (["model=mamba2"], ["model.mixer", "attention"]),
    "stages": (["stages=[3,1]"], ["stages=", "increasing"]),
    "student": (["student.mixer=mamba3"], ["student.mixer='mamba3'", "discrete"]),
    "budget": (["total_tokens=1000"], ["total_tokens=1000", "stage 3"]),
    "unknown-key": (["stage1.token=5"], ["stage1.token"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line(case, tmp_path):
    overrides, expected = BAD[case]
    overrides = [o.replace("{mamba}", str(_mamba_run(tmp_path))) for o in overrides]
    assert_user_error("distill.py", overrides, expected, tmp_path / "run")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "conf" / "distill" / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("student", ["mamba2", "discrete"])
def test_presets_build(experiment, student):
    # A GPU preset on a machine without one is refused (tests/test_cli.py); CI builds it for the CPU.
    on_this_machine = [] if torch.cuda.is_available() else ["trainer=cpu"]
    cfg = run.compose([f"experiment={experiment}", f"student={student}", *on_this_machine], config_name="distill")
    datamodule, teacher, make_student_, variants = distill.build(cfg)
    assert make_student_(teacher).vocab_size == datamodule.vocab_size
    assert variants
