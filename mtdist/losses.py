"""Mean Teacher losses as pure functions (authors' losses.py and main.py).

Every term is summed over samples and divided by the FULL batch size (labeled + unlabeled),
as the authors do; logits are cast to fp32 so the softmax is stable under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NO_LABEL = -1


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over labeled samples (label != -1), divided by the full batch size."""
    total = F.cross_entropy(logits.float(), labels, ignore_index=NO_LABEL, reduction="sum")
    return total / logits.shape[0]


def kl_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher softmax || student softmax), summed over classes, averaged over the batch."""
    student_log_p = F.log_softmax(student_logits.float(), dim=1)
    teacher_p = F.softmax(teacher_logits.detach().float(), dim=1)
    return F.kl_div(student_log_p, teacher_p, reduction="sum") / student_logits.shape[0]


def mse_consistency(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Squared difference of the softmaxes, summed over classes / num_classes, averaged over the batch."""
    student_p = F.softmax(student_logits.float(), dim=1)
    teacher_p = F.softmax(teacher_logits.detach().float(), dim=1)
    batch, num_classes = student_logits.shape
    return F.mse_loss(student_p, teacher_p, reduction="sum") / num_classes / batch


def consistency_loss(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The configured consistency cost; the teacher side never receives gradient."""
    if kind == "kl":
        return kl_consistency(student_logits, teacher_logits)
    if kind == "mse":
        return mse_consistency(student_logits, teacher_logits)
    raise ValueError(f"consistency kind '{kind}' unknown; use kl or mse")


def logit_distance(class_logits: torch.Tensor, cons_logits: torch.Tensor) -> torch.Tensor:
    """sum((head1 - head2)^2) / num_classes / batch: ties the student's two heads together."""
    batch, num_classes = class_logits.shape
    diff = class_logits.float() - cons_logits.float()
    return (diff * diff).sum() / num_classes / batch


@torch.no_grad()
def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, for each k (k capped at num_classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top.eq(labels.unsqueeze(1))
    return [int(hits[:, : min(k, logits.shape[1])].any(dim=1).sum()) for k in ks]
