"""Knowledge distillation while finetuning (``--distill``): the decomposed model, the student, learns
from the labels and from the dense pretrained model, its teacher (Hinton et al. 2015, "Distilling the
Knowledge in a Neural Network"). The math is a pure function; the teacher is a plain module on every
rank, outside DDP and DeepSpeed."""

import contextlib
import copy

import torch
import torch.nn.functional as F

from .distributed import log, on_every_rank
from .loop import Objective
from .model import load_pretrained_weights


def distillation_loss(student, teacher, task_loss, *, alpha: float, temperature: float):
    """``alpha * task_loss + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``, and
    that KL term with its T^2, from the ``student``'s and the ``teacher``'s outputs (batch first,
    classes second) and the task's loss on the student's outputs. Computed in float32, whatever the
    outputs' dtype; no gradient reaches the teacher. T^2 keeps the term's gradients at the task loss's
    scale whatever the temperature. Log-probabilities work as logits (the MNIST network's outputs):
    log_softmax(z) differs from z by a constant per sample, which log_softmax(. / T) removes, so both
    give softmax(z / T)."""
    student = F.log_softmax(student.float() / temperature, dim=1)
    teacher = F.log_softmax(teacher.detach().float() / temperature, dim=1)
    distill = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return alpha * task_loss + (1 - alpha) * distill, distill


def load_teacher(accelerator, dense: torch.nn.Module, pretrained_path) -> torch.nn.Module:
    """A copy of the dense model ``dense`` with the pretrained weights, read on every rank (a file that
    cannot be read or does not fit stops every rank with its message), in eval mode (no dropout, the
    running batch-norm statistics), without gradients, on the accelerator's device. Not for
    ``accelerator.prepare``: it only runs forward, and DDP or DeepSpeed would wrap (ZeRO-3: shard) it
    for nothing."""
    teacher = copy.deepcopy(dense)  # copied, not drawn: the random state stays as the run without --distill
    on_every_rank(lambda: load_pretrained_weights(teacher, pretrained_path))
    return teacher.eval().requires_grad_(False).to(accelerator.device)


class Distillation(Objective):
    """``train``'s objective with ``--distill``: ``distillation_loss`` of the student's outputs against the
    ``teacher``'s on the same batch, with the recipe's ``task_loss(output, target)``; its terms, ``task``
    and ``distill``, are logged beside the loss. The teacher runs under ``autocast()`` (pass
    ``accelerator.autocast``: the mixed precision the student runs in, float32 without)."""

    def __init__(self, task_loss, teacher, *, alpha: float, temperature: float, autocast=contextlib.nullcontext):
        super().__init__(task_loss)
        self.teacher, self.alpha, self.temperature, self.autocast = teacher, alpha, temperature, autocast
        log(
            f"[Distill] against the dense pretrained model: loss = {alpha:g} x task + {1 - alpha:g} x "
            f"T^2 x KL(teacher || student), T = {temperature:g}"
        )

    def __call__(self, output, target, data):
        with torch.no_grad(), self.autocast():
            teacher = self.teacher(data)
        # The student's outputs in float32 (DeepSpeed may run it in another dtype): a float32 output is
        # used as it is, so --distill-alpha 1 trains exactly as without --distill.
        output = output.float()
        task = self.loss_fn(output, target)
        loss, distill = distillation_loss(output, teacher, task, alpha=self.alpha, temperature=self.temperature)
        return loss, {"task": task, "distill": distill}


def training_objective(accelerator, task_loss, dense, run, pretrained_path, memory_format=torch.preserve_format):
    """A recipe's objective: its ``task_loss``, or with ``--distill`` (``run``, the checked RunMode) the
    ``Distillation`` against ``dense`` with the weights of ``pretrained_path``, in ``memory_format``."""
    if not run.distill:
        return task_loss
    teacher = load_teacher(accelerator, dense, pretrained_path).to(memory_format=memory_format)
    return Distillation(
        task_loss, teacher, alpha=run.distill_alpha, temperature=run.distill_temperature, autocast=accelerator.autocast
    )
