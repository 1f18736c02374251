"""Distillation (``--distill``): the loss as a pure function, the teacher, and the objective in the
training loop on one process (the recipes' runs are in tests/recipes/test_mnist.py)."""

import re

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from launch import loop
from launch.checkpoints import Progress
from launch.distill import Distillation, distillation_loss, load_teacher
from launch.entry import RunError
from launch.preemption import Preemption
from lowrank.io import save_state_dict


@pytest.fixture
def outputs():
    """A student's and a teacher's logits for 8 samples of 5 classes, and the student's task loss."""
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(8, 5, generator=generator, requires_grad=True)
    teacher = 3 * torch.randn(8, 5, generator=generator)
    target = torch.randint(0, 5, (8,), generator=generator)
    return student, teacher, F.cross_entropy(student, target)


def test_alpha_one_is_the_task_loss_exactly(outputs):
    student, teacher, task = outputs
    loss, distill = distillation_loss(student, teacher, task, alpha=1.0, temperature=4.0)
    assert torch.equal(loss, task) and distill > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_the_kl_term_is_scaled_by_the_temperature_squared(outputs, temperature):
    student, teacher, task = outputs
    loss, distill = distillation_loss(student, teacher, task, alpha=0.25, temperature=temperature)
    soft_teacher = F.softmax(teacher / temperature, dim=1)
    kl = (soft_teacher * (soft_teacher.log() - F.log_softmax(student / temperature, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(distill, temperature**2 * kl)
    torch.testing.assert_close(loss, 0.25 * task + 0.75 * temperature**2 * kl)


def test_a_student_that_matches_its_teacher_has_no_distillation_loss(outputs):
    student, _, task = outputs
    loss, distill = distillation_loss(student, student.detach().clone(), task, alpha=0.5, temperature=4.0)
    assert distill.item() == 0 and torch.equal(loss, 0.5 * task)


def test_the_gradient_reaches_the_student_only(outputs):
    student, teacher, task = outputs
    teacher.requires_grad_(True)
    loss, _ = distillation_loss(student, teacher, task, alpha=0.0, temperature=4.0)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_log_probabilities_distil_as_their_logits_in_float32(outputs):
    """The MNIST network's outputs are log_softmax's: the same loss as its logits give."""
    student, teacher, task = outputs
    from_logits = distillation_loss(student, teacher, task, alpha=0.5, temperature=4.0)
    from_log_probabilities = distillation_loss(
        F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), task, alpha=0.5, temperature=4.0
    )
    torch.testing.assert_close(from_log_probabilities, from_logits)
    loss, distill = distillation_loss(student.bfloat16(), teacher.bfloat16(), task, alpha=0.5, temperature=4.0)
    assert loss.dtype == distill.dtype == torch.float32


def test_the_teacher_is_the_pretrained_dense_model_frozen_and_the_random_state_is_left_alone(tmp_path):
    dense = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    pretrained = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    save_state_dict(pretrained.state_dict(), tmp_path / "dense.pth")
    state = torch.random.get_rng_state()
    teacher = load_teacher(Accelerator(cpu=True), dense, tmp_path / "dense.pth")
    assert torch.equal(torch.random.get_rng_state(), state)  # a run with --distill draws as one without
    assert teacher is not dense and not teacher.training and dense.training
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    assert torch.equal(teacher[0].weight, pretrained[0].weight)
    assert not torch.equal(dense[0].weight, pretrained[0].weight)  # the student's model is left as it was
    with pytest.raises(RunError, match=r"rank 0 on .*: InputFileError: --pretrained-path: .* does not fit the model"):
        load_teacher(Accelerator(cpu=True), torch.nn.Linear(5, 3), tmp_path / "dense.pth")


def train_linear(tmp_path, loss_fn):
    """A Linear model trained 3 steps on ``loss_fn`` from the same start and batches; its weights."""
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 5)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    generator = torch.Generator().manual_seed(1)
    loader = [(torch.randn(8, 4, generator=generator), torch.randint(0, 5, (8,), generator=generator))] * 3
    loop.train(
        accelerator, model, optimizer, loader, Progress(), steps=3, log_steps=1, output_dir=tmp_path,
        settings={"output_dir": str(tmp_path)}, loss_fn=loss_fn,
    )  # fmt: skip
    return model.weight.detach().clone()


def test_train_logs_the_terms_and_alpha_one_trains_as_without_distillation(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "preemption", Preemption())  # no signal left from another test
    torch.manual_seed(2)
    teacher = torch.nn.Linear(4, 5)  # gradients on: the objective must not give it any

    def distilling(alpha):
        return Distillation(F.cross_entropy, teacher, alpha=alpha, temperature=2.0)

    plain = train_linear(tmp_path / "plain", F.cross_entropy)
    plain_log = capsys.readouterr().out
    assert torch.equal(train_linear(tmp_path / "alpha_1", distilling(1.0)), plain)  # bit for bit
    alpha_1_log = capsys.readouterr().out
    assert "[Distill] against the dense pretrained model: loss = 1 x task + 0 x T^2 x KL" in alpha_1_log
    assert not torch.equal(train_linear(tmp_path / "alpha_half", distilling(0.5)), plain)
    alpha_half_log = capsys.readouterr().out
    assert teacher.weight.grad is None

    def losses(log):
        return re.findall(
            r"^\[Train\] Step\[\d/3\] Loss: ([\d.]+)(?: \(task ([\d.]+), distill ([\d.]+)\))?, ", log, re.M
        )

    assert [loss for loss, _, _ in losses(plain_log)] == [loss for loss, _, _ in losses(alpha_1_log)]
    assert all(not task for _, task, _ in losses(plain_log))  # without distillation, the line is as before
    assert all(loss == task for loss, task, _ in losses(alpha_1_log))
    for loss, task, distill in losses(alpha_half_log):
        assert float(loss) == pytest.approx(0.5 * float(task) + 0.5 * float(distill), abs=2e-6)
    assert len(losses(alpha_half_log)) == 3
