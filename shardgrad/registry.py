"""One list per vocabulary a job spec names: losses, eval metrics, optimizers.

The spec validator (`jobspec`), the job runtime (`training`) and the data checks
(`datasets`) all read these tables, so a name exists in one place or nowhere.
"""

import numpy as np

from .core import functional as F
from .core import optim

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
