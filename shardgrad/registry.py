"""One list per vocabulary a job spec names: losses, eval metrics, optimizers.

The spec validator (`jobspec`), the job runtime (`training`) and the data checks
(`datasets`) all read these tables, so a name exists in one place or nowhere.
"""

import numpy as np

from .core import functional as F
from .core import lr_scheduler, optim

# name -> loss function (out, target, reduction="mean")
LOSSES = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "nll": F.nll_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}
CLASSIFICATION_LOSSES = ("cross_entropy", "nll", "bce_with_logits")
LABEL_LOSSES = ("cross_entropy", "nll")  # targets are integer class labels in [0, outputs)
BINARY_LOSSES = ("bce_with_logits",)  # targets are 0 or 1


def _accuracy(out: np.ndarray, y: np.ndarray) -> float:
    pred = (out[:, 0] > 0).astype(y.dtype) if out.shape[1:] == (1,) else out.argmax(1)
    return float(np.mean(pred == y.reshape(pred.shape)))


def _mse(out: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((out - y.reshape(out.shape)) ** 2))


# name -> metric(model outputs, targets) on the held-out set
METRICS = {"accuracy": _accuracy, "mse": _mse}

# name -> (class, hyper-parameters with PyTorch's defaults; `lr` is always required)
OPTIMIZERS = {
    "sgd": (optim.SGD, {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}),
    "adam": (optim.Adam, {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}),
    "adamw": (optim.AdamW, {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}),
}

# name -> (class, {torch's argument: (kind, default)}); a default of None means required.
# Kinds (checked by jobspec): count = integer >= 1, milestones = increasing integers >= 1,
# positive = number > 0, nonneg = number >= 0, factor = number in (0, 1], fraction = [0, 1].
SCHEDULERS = {
    "step": (lr_scheduler.StepLR, {"step_size": ("count", None), "gamma": ("positive", 0.1)}),
    "multistep": (
        lr_scheduler.MultiStepLR,
        {"milestones": ("milestones", None), "gamma": ("positive", 0.1)},
    ),
    "exponential": (lr_scheduler.ExponentialLR, {"gamma": ("positive", None)}),
    "cosine": (
        lr_scheduler.CosineAnnealingLR,
        {"T_max": ("count", None), "eta_min": ("nonneg", 0.0)},
    ),
    "linear": (
        lr_scheduler.LinearLR,
        {
            "start_factor": ("factor", 1.0 / 3),
            "end_factor": ("fraction", 1.0),
            "total_iters": ("count", 5),
        },
    ),
}


def make_scheduler(optimizer, tables):
    """The scheduler a spec's (validated) `scheduler` list describes, or None: one table is
    that scheduler, several run one after another (SequentialLR) at the running totals of
    their `steps`."""
    if not tables:
        return None
    scheds = []
    for t in tables:
        cls = SCHEDULERS[t["type"]][0]
        scheds.append(cls(optimizer, **{k: v for k, v in t.items() if k not in ("type", "steps")}))
    if len(scheds) == 1:
        return scheds[0]
    milestones, at = [], 0
    for t in tables[:-1]:
        at += t["steps"]
        milestones.append(at)
    return lr_scheduler.SequentialLR(optimizer, scheds, milestones)
