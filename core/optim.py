"""Optimizers with exactly PyTorch's update formulas (its single-tensor CPU path).

Updates happen in place with `out=` into buffers allocated once per parameter, so a step
allocates nothing per parameter. The state is plain arrays and numbers: the coordinator
checkpoints it with `state_dict()`.
"""

import math

import numpy as np

from .tensor import bump_version


class Optimizer:
    defaults: dict = {}

    def __init__(self, params, **hyper):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        unknown = set(hyper) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown argument(s) {sorted(unknown)}")
        group = {**self.defaults, **hyper, "params": self.params}
        if group["lr"] is None or group["lr"] < 0:
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        self.param_groups = [group]
        self.state: dict[int, dict] = {}

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def step(self):
        group = self.param_groups[0]
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._update(p.data, p.grad.data, self.state.setdefault(i, {}), group)
                bump_version(p)

    def state_dict(self):
        """As torch's: the state's own arrays, not copies (copy what you keep while it
        steps on); load_state_dict copies what it loads."""
        state = {
            i: {k: v for k, v in s.items() if not k.startswith("_")}  # scratch is not state
            for i, s in self.state.items()
        }
        group = dict(self.param_groups[0], params=list(range(len(self.params))))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict):
        group = dict(state_dict["param_groups"][0])
        if len(group.pop("params")) != len(self.params):
            raise ValueError("loaded state dict has a different number of parameters")
        self.param_groups = [{**self.defaults, **group, "params": self.params}]
        self.state = {
            int(i): {k: (np.array(v) if isinstance(v, np.ndarray) else v) for k, v in s.items()}
            for i, s in state_dict["state"].items()
        }


class SGD(Optimizer):
    # What it keeps per parameter once it has stepped: arrays shaped as it, and counts.
    state_arrays, state_counts = ("momentum_buffer",), ()
    defaults = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
    }

    def __init__(self, params, lr=1e-3, **kw):
        super().__init__(params, lr=lr, **kw)
        g = self.param_groups[0]
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _update(self, p, grad, st, g):
        d_p = grad
        if g["weight_decay"]:
            d_p = np.multiply(p, g["weight_decay"], out=_tmp(st, p))
            d_p += grad  # grad.add(p, alpha=wd)
        if g["momentum"]:
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = np.array(d_p, copy=True)
            else:
                buf *= g["momentum"]
                if g["dampening"]:
                    np.add(buf, np.multiply(d_p, 1 - g["dampening"], out=_tmp2(st, p)), out=buf)
                else:
                    buf += d_p
            if g["nesterov"]:
                d_p = np.add(
                    d_p, np.multiply(buf, g["momentum"], out=_tmp2(st, p)), out=_tmp(st, p)
                )
            else:
                d_p = buf
        p -= np.multiply(d_p, g["lr"], out=_tmp2(st, p))


class Adam(Optimizer):
    state_arrays, state_counts = ("exp_avg", "exp_avg_sq"), ("step",)
    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    decoupled = False

    def _update(self, p, grad, st, g):
        beta1, beta2 = g["betas"]
        if not st:
            st.update(step=0, exp_avg=np.zeros_like(p), exp_avg_sq=np.zeros_like(p))
        st["step"] += 1
        m, v, tmp = st["exp_avg"], st["exp_avg_sq"], _tmp(st, p)
        if g["weight_decay"] and self.decoupled:
            p *= 1 - g["lr"] * g["weight_decay"]
        elif g["weight_decay"]:
            grad = np.add(
                grad, np.multiply(p, g["weight_decay"], out=_tmp2(st, p)), out=_tmp2(st, p)
            )
        # m.lerp_(grad, 1 - beta1): m + w * (grad - m)
        np.subtract(grad, m, out=tmp)
        tmp *= 1 - beta1
        m += tmp
        # v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        v *= beta2
        np.multiply(grad, grad, out=tmp)
        tmp *= 1 - beta2
        v += tmp
        step_size = g["lr"] / (1 - beta1 ** st["step"])
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** st["step"])
        # denom = (v.sqrt() / bias_correction2_sqrt).add_(eps); p.addcdiv_(m, denom, -step_size)
        np.sqrt(v, out=tmp)
        tmp /= bias_correction2_sqrt
        tmp += g["eps"]
        np.divide(m, tmp, out=tmp)
        tmp *= -step_size
        p += tmp


class AdamW(Adam):
    defaults = {**Adam.defaults, "weight_decay": 1e-2}
    decoupled = True


def _tmp(st, p):
    """A scratch buffer per parameter, allocated on the first step only."""
    buf = st.get("_tmp")
    if buf is None:
        buf = st["_tmp"] = np.empty_like(p)
    return buf


def _tmp2(st, p):
    buf = st.get("_tmp2")
    if buf is None:
        buf = st["_tmp2"] = np.empty_like(p)
    return buf
