"""Weights that leave the service: safetensors files and PyTorch modules.

shardgrad names a model's tensors as `torch.nn.Sequential` built from the same layer list
does ("0.weight", "0.bias", "3.running_mean", ...), so a state dict from `fetch` loads into
that module as it is:

    to_safetensors(spec, weights, "model.safetensors")   # safetensors, PyTorch / HF load it
    module = to_torch(spec, weights)                      # torch.nn.Sequential, eval mode

torch is optional: it is imported only by `to_torch`.
"""

from __future__ import annotations

import numpy as np

from .core.nn import LAYERS, plan
from .jobspec import JobSpec, parse_spec


def _spec(spec) -> JobSpec:
    return spec if isinstance(spec, JobSpec) else parse_spec(spec)


def expected_names(spec) -> list[str]:
    """The tensor names (and order) of the spec's model, as torch's state_dict lists them."""
    from .core.nn import build

    spec = _spec(spec)
    model = build(list(spec.model), list(spec.input_shape), spec.seed)
    return list(model.state_dict())


def to_safetensors(spec, weights: dict, path: str) -> str:
    """Write `weights` ({name: array}) as a safetensors file; with a spec (or None to skip
    the check) the names must be its model's. Returns the path written."""
    from safetensors.numpy import save_file

    if spec is not None:
        want = expected_names(spec)
        if sorted(want) != sorted(weights):
            raise ValueError(
                f"weights do not fit the spec's model: expected {want}, got {sorted(weights)}"
            )
        weights = {n: weights[n] for n in want}
    arrays = {n: np.ascontiguousarray(a) for n, a in weights.items()}
    save_file(arrays, path, metadata={"format": "pt"})  # "pt": how transformers expects it
    return path


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


# layer type -> (torch.nn, per-sample input shape, args) -> torch module; one entry per
# LAYERS type (a test checks that none is missing).
TORCH_LAYERS = {
    "linear": lambda nn, s, a: nn.Linear(s[0], a["out"], bias=a["bias"]),
    "conv2d": lambda nn, s, a: nn.Conv2d(
        s[0], a["out"], a["kernel"], stride=a["stride"], padding=a["padding"], bias=a["bias"]
    ),
    "maxpool2d": lambda nn, s, a: nn.MaxPool2d(
        a["kernel"], a["stride"] or a["kernel"], padding=a.get("padding", 0)
    ),
    "avgpool2d": lambda nn, s, a: nn.AvgPool2d(
        a["kernel"], a["stride"] or a["kernel"], padding=a.get("padding", 0)
    ),
    "flatten": lambda nn, s, a: nn.Flatten(),
    "relu": lambda nn, s, a: nn.ReLU(),
    "tanh": lambda nn, s, a: nn.Tanh(),
    "sigmoid": lambda nn, s, a: nn.Sigmoid(),
    "gelu": lambda nn, s, a: nn.GELU(),
    "dropout": lambda nn, s, a: nn.Dropout(a["p"]),
    "layernorm": lambda nn, s, a: nn.LayerNorm(s[-1], eps=a["eps"]),
    "batchnorm1d": lambda nn, s, a: nn.BatchNorm1d(s[0], eps=a["eps"], momentum=a["momentum"]),
    "batchnorm2d": lambda nn, s, a: nn.BatchNorm2d(s[0], eps=a["eps"], momentum=a["momentum"]),
    "embedding": lambda nn, s, a: nn.Embedding(a["num"], a["dim"]),
}


def to_torch(spec, weights: dict):
    """The `torch.nn.Sequential` the spec's layer list describes, with `weights` loaded
    (strict: every name must match), in eval mode. Needs torch installed."""
    try:
        import torch
    except ImportError:
        raise ImportError("to_torch needs PyTorch: pip install torch") from None
    spec = _spec(spec)
    steps, _, _ = plan([dict(layer) for layer in spec.model], list(spec.input_shape))
    missing = [kind for kind, _, _ in steps if kind not in TORCH_LAYERS or kind not in LAYERS]
    if missing:
        raise ValueError(f"no PyTorch equivalent for layer type(s) {missing}")
    module = torch.nn.Sequential(*(TORCH_LAYERS[k](torch.nn, s, a) for k, a, s in steps))
    state = {n: torch.from_numpy(np.array(a)) for n, a in weights.items()}
    module.load_state_dict(state, strict=True)
    return module.eval()
