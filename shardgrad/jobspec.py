"""Job specs: parse TOML / JSON / dict, validate every key, report every problem at once.

A spec is data, never code: it can only name layers, losses and optimizers from the
built-in registries below, and nothing in it is ever imported, evaluated or unpickled.
`JobSpec.to_dict()` is plain data (str, int, float, bool, list, dict) so it can travel in a
msgpack header; `parse_spec(spec.to_dict()) == spec`.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass
from typing import Any

from .core.nn import BOOL, EPS, LAYERS, NONNEG, POS, PROB, plan
from .datasets import SYNTHETIC_DEFAULTS
from .registry import CLASSIFICATION_LOSSES, LOSSES, METRICS, OPTIMIZERS, SCHEDULERS

MiB = 1 << 20
MAX_INT = 2**63 - 1  # everything must fit a msgpack int64 and numpy seeds

SOURCES = ("builtin:digits", "builtin:synthetic", "file:PATH.npz")
SYNTHETIC = SYNTHETIC_DEFAULTS  # the parameters of builtin:synthetic and their defaults
# Where a job's rounds are computed. "auto": on the coordinator itself when a whole round
# costs less there than the fixed cost of a round through workers, else on the workers
# (coordinator/placement.py); "workers": always on the workers. The bits are the same.
PLACEMENTS = ("auto", "workers")
TOP_KEYS = (
    "name model input_shape loss optimizer data global_batch micro_batch accumulate_steps "
    "epochs rounds seed min_workers checkpoint_every eval verify scheduler clip_grad_norm init "
    "placement"
).split()


@dataclass(frozen=True)
class SpecLimits:
    max_spec_bytes: int = 1 * MiB
    max_layers: int = 256
    max_params: int = 50_000_000  # counted by nn.plan before anything is allocated
    max_synthetic_elements: int = 50_000_000  # n_samples * n_features
    max_name_len: int = 200


DEFAULT_SPEC_LIMITS = SpecLimits()


class SpecError(ValueError):
    """Every problem found in a spec; str() lists them one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: tuple[dict, ...]
    input_shape: tuple[int, ...]
    loss: str
    optimizer: dict  # type, lr and every hyper-parameter, defaults filled in
    data: dict  # source (+ synthetic parameters, defaults filled in)
    global_batch: int
    micro_batch: int
    accumulate_steps: int = 1
    epochs: int | None = None
    rounds: int | None = None
    seed: int = 0
    min_workers: int = 1
    checkpoint_every: int = 10
    eval: dict | None = None  # holdout, metric
    verify: float = 0.05  # fraction of blocks a second worker recomputes and compares
    scheduler: tuple[dict, ...] = ()  # lr schedulers run one after another (defaults filled)
    clip_grad_norm: float | None = None  # max global gradient norm (torch's clip_grad_norm_)
    init: str | None = None  # "file:PATH.npz|.safetensors" or "job:ID": weights to start from
    placement: str = "auto"  # see PLACEMENTS

    @property
    def n_micro_batches(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def task(self) -> str:
        return "classification" if self.loss in CLASSIFICATION_LOSSES else "regression"

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "model": [dict(layer) for layer in self.model],
            "input_shape": list(self.input_shape),
            "loss": self.loss,
            "optimizer": copy.deepcopy(self.optimizer),
            "data": dict(self.data),
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
            "accumulate_steps": self.accumulate_steps,
            "seed": self.seed,
            "min_workers": self.min_workers,
            "checkpoint_every": self.checkpoint_every,
            "eval": dict(self.eval or {}),
            "verify": self.verify,
        }
        d["epochs" if self.epochs is not None else "rounds"] = self.epochs or self.rounds
        # the optional training features only when set, so older specs keep their dicts
        if self.scheduler:
            d["scheduler"] = copy.deepcopy(list(self.scheduler))
        if self.clip_grad_norm is not None:
            d["clip_grad_norm"] = self.clip_grad_norm
        if self.init is not None:
            d["init"] = self.init
        if self.placement != "auto":
            d["placement"] = self.placement
        return d

    @classmethod
    def from_dict(cls, d: dict, limits: SpecLimits = DEFAULT_SPEC_LIMITS) -> JobSpec:
        return parse_spec(d, limits)


# --- reading -------------------------------------------------------------------------------


def _read_source(source: Any, limits: SpecLimits, files: bool = True) -> dict:
    """The spec as a dict, from a dict, a path (if `files`), or TOML / JSON text."""
    if isinstance(source, dict):
        return source
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError:
            raise SpecError(["spec text is not valid UTF-8"]) from None
    path = None
    if isinstance(source, os.PathLike):
        path = os.fspath(source)
    elif isinstance(source, str):
        text = source.strip()
        # Inline text has a newline or '=' (TOML) or starts with '{' / '['; else a path.
        if not (text[:1] in "{[" or "\n" in text or "=" in text or len(text) > 4096):
            path = source
    else:
        raise SpecError([f"a spec must be a dict, a path or TOML/JSON text, not {type(source)}"])
    if path is not None and not files:
        # A spec that arrived over the network: naming a file must never make us open it
        # (its contents could leak into the error; /dev/zero never ends).
        raise SpecError(
            [
                "spec text must be TOML or JSON: send the file's contents (a coordinator or "
                "worker never opens a file named in a message)"
            ]
        )
    if path is not None:
        try:
            # Never trust a size: /dev/zero, a FIFO or /dev/stdin say 0 and never end.
            # Read one byte past the limit, so "too big" is known without reading more.
            with open(path, "rb") as f:
                data = f.read(limits.max_spec_bytes + 1)
            too_big = len(data) > limits.max_spec_bytes
            source = "" if too_big else data.decode("utf-8")
        except (OSError, ValueError) as exc:  # missing file, bad path, not UTF-8
            raise SpecError([f"cannot read spec file {_short(path)}: {exc}"]) from None
        if too_big:
            raise SpecError(
                [f"spec file {_short(path)} is larger than {limits.max_spec_bytes} bytes"]
            )
    if len(source.encode("utf-8", "surrogatepass")) > limits.max_spec_bytes:
        raise SpecError([f"spec is larger than {limits.max_spec_bytes} bytes"])
    is_json = source.lstrip().startswith("{") or (path or "").endswith(".json")
    try:
        data = json.loads(source) if is_json else tomllib.loads(source)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError / TOMLDecodeError
        kind = "JSON" if is_json else "TOML"
        raise SpecError([f"spec is not valid {kind}: {exc}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"a spec must be a table/object, got {type(data).__name__}"])
    return data


# --- value checks: each returns the (normalised) value or records a problem ----------------


class _Checker:
    def __init__(self):
        self.problems: list[str] = []

    def bad(self, key: str, expected: str, value: Any = ...) -> None:
        got = "" if value is ... else f", got {_short(value)}"
        self.problems.append(f"{key}: expected {expected}{got}")

    def unknown(self, table: dict, known, prefix: str = "") -> None:
        for key in table:
            if key in known:
                continue
            where = f"{prefix}{key}" if isinstance(key, str) else repr(key)
            hint = difflib.get_close_matches(str(key), list(known), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            self.problems.append(f"unknown key '{where}'{extra}")

    def int_(self, key, value, lo=1, hi=MAX_INT):
        if type(value) is not int or not lo <= value <= hi:
            self.bad(key, f"an integer >= {lo}" + (f" and <= {hi}" if hi < MAX_INT else ""), value)
            return None
        return value

    def float_(self, key, value, lo=None, hi=None, lo_open=False, hi_open=True, what=None):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
        ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
        ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
        if not ok:
            self.bad(key, what or "a finite number", value)
            return None
        return float(value)

    def choice(self, key, value, options):
        if not isinstance(value, str) or value not in options:
            self.bad(key, "one of " + ", ".join(f"'{o}'" for o in options), value)
            return None
        return value

    def table(self, key, value) -> dict | None:
        if not isinstance(value, dict):
            self.bad(key, "a table", value)
            return None
        return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_layer(c: _Checker, i: int, layer: Any) -> None:
    where = f"model[{i}]"
    if not isinstance(layer, dict):
        return c.bad(where, "a layer table like {type = 'linear', out = 10}", layer)
    ltype = layer.get("type")
    if not isinstance(ltype, str) or ltype not in LAYERS:
        return c.bad(f"{where}.type", "one of " + ", ".join(LAYERS), ltype)
    lt = LAYERS[ltype]  # the registry nn.build uses: one table of layers and their keys
    c.unknown(layer, {"type", *lt.keys}, f"{where}.")
    for key in lt.required:
        if key not in layer:
            c.problems.append(f"{where} ({ltype}): missing required key '{key}'")
    for key, kind in lt.keys.items():
        if key not in layer:
            continue
        value, k = layer[key], f"{where}.{key}"
        if kind == BOOL and not isinstance(value, bool):
            c.bad(k, "true or false", value)
        elif kind in (POS, NONNEG):
            c.int_(k, value, lo=1 if kind == POS else 0, hi=1 << 31)
        elif kind == PROB:
            c.float_(k, value, 0.0, 1.0, what="a probability in [0, 1)")
        elif kind == EPS:
            c.float_(k, value, 0.0, None, lo_open=True, what="a number > 0")


def _check_model(c: _Checker, spec: dict, input_shape, limits: SpecLimits) -> None:
    model = spec["model"]
    if not isinstance(model, list) or not model:
        return c.bad("model", "a non-empty list of layer tables", model)
    if len(model) > limits.max_layers:
        return c.bad("model", f"at most {limits.max_layers} layers", len(model))
    before = len(c.problems)
    for i, layer in enumerate(model):
        _check_layer(c, i, layer)
    if len(c.problems) > before or input_shape is None:
        return
    try:  # the shapes walked without allocating: a huge model costs nothing to refuse
        n_params = plan([dict(layer) for layer in model], list(input_shape))[2]
    except ValueError as exc:  # "layer 3 (linear): ..."
        return c.problems.append(f"model: {exc}")
    except Exception as exc:  # a validator must never take the coordinator down
        return c.problems.append(f"model: cannot be built ({type(exc).__name__}: {exc})")
    if n_params > limits.max_params:
        return c.bad("model", f"at most {limits.max_params} parameters", n_params)


def _check_optimizer(c: _Checker, opt: dict) -> dict:
    otype = c.choice("optimizer.type", opt.get("type", "sgd"), tuple(OPTIMIZERS))
    if otype is None:
        return {}
    defaults = OPTIMIZERS[otype][1]
    c.unknown(opt, {"type", "lr", *defaults}, "optimizer.")
    out = {"type": otype, **copy.deepcopy(defaults)}  # never share the default betas list
    if "lr" not in opt:
        c.problems.append("optimizer.lr: missing (the learning rate, a number > 0)")
    else:
        out["lr"] = c.float_("optimizer.lr", opt["lr"], 0.0, lo_open=True, what="a number > 0")
    for key in ("momentum", "dampening", "weight_decay"):
        if key in opt and key in defaults:
            out[key] = c.float_(f"optimizer.{key}", opt[key], 0.0, what="a number >= 0")
    if "eps" in opt and "eps" in defaults:
        out["eps"] = c.float_("optimizer.eps", opt["eps"], 0.0, lo_open=True, what="a number > 0")
    if "nesterov" in opt and "nesterov" in defaults:
        if isinstance(opt["nesterov"], bool):
            out["nesterov"] = opt["nesterov"]
        else:
            c.bad("optimizer.nesterov", "true or false", opt["nesterov"])
    if "betas" in opt and "betas" in defaults:
        betas = opt["betas"]
        if isinstance(betas, list) and len(betas) == 2 and all(map(_is_beta, betas)):
            out["betas"] = [float(b) for b in betas]
        else:
            c.bad("optimizer.betas", "two numbers in [0, 1), like [0.9, 0.999]", betas)
    if out.get("nesterov") and (not out.get("momentum") or out.get("dampening")):
        c.problems.append("optimizer.nesterov: needs momentum > 0 and dampening = 0")
    return out


def _is_beta(b: Any) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1


def _check_scheduler(c: _Checker, value: Any) -> tuple[dict, ...]:
    """`scheduler`: one table, or an array of tables run one after another (each but the
    last with `steps`, its length in optimizer steps). Defaults filled in."""
    tables = [value] if isinstance(value, dict) else value
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        c.bad("scheduler", "a table [scheduler] or an array of tables [[scheduler]]", value)
        return ()
    out = []
    for i, t in enumerate(tables):
        where = "scheduler" if isinstance(value, dict) else f"scheduler[{i}]"
        stype = c.choice(f"{where}.type", t.get("type"), tuple(SCHEDULERS))
        if stype is None:
            continue
        args = SCHEDULERS[stype][1]
        last = i == len(tables) - 1
        c.unknown(t, {"type", *args, *(() if last else ("steps",))}, f"{where}.")
        if last and "steps" in t:
            c.problems.append(
                f"{where}.steps: the last scheduler runs to the end of the job; remove 'steps'"
            )
        row = {"type": stype}
        if not last:
            if "steps" not in t:
                c.problems.append(
                    f"{where}.steps: missing (every scheduler but the last needs its length "
                    "in optimizer steps, an integer >= 1)"
                )
            else:
                row["steps"] = c.int_(f"{where}.steps", t["steps"])
        for key, (kind, default) in args.items():
            if key not in t:
                if default is None:
                    c.problems.append(f"{where}.{key}: missing (required for '{stype}')")
                row[key] = default
                continue
            row[key] = _scheduler_arg(c, f"{where}.{key}", kind, t[key])
        out.append(row)
    return tuple(out)


def _scheduler_arg(c: _Checker, key: str, kind: str, v: Any) -> Any:
    if kind == "count":
        return c.int_(key, v)
    if kind == "milestones":
        ok = isinstance(v, list) and v and all(type(m) is int and m >= 1 for m in v)
        if not (ok and all(a < b for a, b in zip(v, v[1:], strict=False))):
            c.bad(key, "a list of increasing integers >= 1, like [30, 80]", v)
            return None
        return list(v)
    bounds = {
        "positive": (0.0, None, True, True, "a number > 0"),
        "nonneg": (0.0, None, False, True, "a number >= 0"),
        "factor": (0.0, 1.0, True, False, "a number in (0, 1]"),
        "fraction": (0.0, 1.0, False, False, "a number in [0, 1]"),
    }[kind]
    lo, hi, lo_open, hi_open, what = bounds
    return c.float_(key, v, lo, hi, lo_open=lo_open, hi_open=hi_open, what=what)


def _check_init(c: _Checker, value: Any) -> str | None:
    ok = isinstance(value, str) and "\x00" not in value and len(value) <= 1000
    path = value[len("file:") :] if ok and value.startswith("file:") else ""
    if path.endswith(".npz") and len(path) > 4 or path.endswith(".safetensors") and len(path) > 12:
        return value
    if ok and value.startswith("job:") and len(value) > 4 and value[4:].isprintable():
        return value
    c.bad(
        "init",
        "'file:PATH.npz' or 'file:PATH.safetensors' (under the data root) or 'job:JOB-ID' "
        "(a done job)",
        value,
    )
    return None


def _check_data(c: _Checker, data: dict, limits: SpecLimits) -> dict:
    source = data.get("source")
    if not isinstance(source, str) or not (
        source in ("builtin:digits", "builtin:synthetic") or source.startswith("file:")
    ):
        c.bad("data.source", "one of " + ", ".join(f"'{s}'" for s in SOURCES), source)
        return {}
    if source != "builtin:synthetic":
        c.unknown(data, {"source"}, "data.")
        path = source[len("file:") :]
        if source.startswith("file:") and (not path.endswith(".npz") or "\x00" in path):
            c.bad("data.source", "'file:PATH.npz' with a path to an .npz file", source)
        return {"source": source}
    c.unknown(data, {"source", *SYNTHETIC}, "data.")
    out = {"source": source, **SYNTHETIC, **{k: v for k, v in data.items() if k in SYNTHETIC}}
    out["task"] = c.choice("data.task", out["task"], ("classification", "regression"))
    out["n_samples"] = c.int_("data.n_samples", out["n_samples"], 1)
    out["n_features"] = c.int_("data.n_features", out["n_features"], 1)
    out["n_classes"] = c.int_("data.n_classes", out["n_classes"], 2, 1 << 20)
    out["noise"] = c.float_("data.noise", out["noise"], 0.0, what="a number >= 0")
    out["seed"] = c.int_("data.seed", out["seed"], 0)
    if out["n_samples"] and out["n_features"]:
        size = out["n_samples"] * out["n_features"]
        if size > limits.max_synthetic_elements:
            c.bad("data", f"n_samples * n_features <= {limits.max_synthetic_elements}", size)
    return out


MICRO_BATCH_RULE = (
    "micro_batch defaults to global_batch / k, k the largest of 8, 4, 2 that divides it and "
    "leaves micro-batches of at least 64 samples (else the whole batch). k is how many workers "
    "can share a round; the price is the contract's tax, the slower small GEMMs of "
    "micro-batches (measured 1.05-1.35x for k = 2..8 at 1024 samples, up to 2x at 32-sample "
    "micro-batches: benchmarks/contract_floor.py)."
)


def default_micro_batch(global_batch: int) -> int:
    """See MICRO_BATCH_RULE."""
    for k in (8, 4, 2):
        if global_batch % k == 0 and global_batch // k >= 64:
            return global_batch // k
    return global_batch


def parse_spec(
    source: Any, limits: SpecLimits = DEFAULT_SPEC_LIMITS, *, files: bool = True
) -> JobSpec:
    """A validated JobSpec from a dict, a TOML/JSON file path, or TOML/JSON text.
    `files=False` (specs from the network) refuses a path instead of opening it.

    Raises SpecError listing every problem found (never any other exception).
    """
    raw = _read_source(source, limits, files)
    c = _Checker()
    c.unknown(raw, TOP_KEYS)
    for key in ("name", "model", "input_shape", "optimizer", "data", "global_batch"):
        if key not in raw:
            c.problems.append(f"{key}: missing (required)")
    get = raw.get

    name = get("name")
    if "name" in raw and not (isinstance(name, str) and 0 < len(name) <= limits.max_name_len):
        c.bad("name", f"a non-empty string of at most {limits.max_name_len} characters", name)
    shape = get("input_shape")
    if "input_shape" in raw:
        ok = isinstance(shape, list) and 0 < len(shape) <= 8
        if not (ok and all(type(d) is int and 0 < d <= 1 << 31 for d in shape)):
            c.bad("input_shape", "a list of 1 to 8 positive integers, like [64]", shape)
            shape = None
    loss = c.choice("loss", get("loss", "cross_entropy"), tuple(LOSSES))
    seed = c.int_("seed", get("seed", 0), lo=0)
    ints = {}
    for key in ("global_batch", "micro_batch"):  # global_batch is required, checked above
        if key in raw:
            ints[key] = c.int_(key, raw[key], hi=1 << 31)
    if "micro_batch" not in raw and ints.get("global_batch"):
        ints["micro_batch"] = default_micro_batch(ints["global_batch"])
    for key, default in (("accumulate_steps", 1), ("min_workers", 1), ("checkpoint_every", 10)):
        ints[key] = c.int_(key, get(key, default))
    gb, mb = ints.get("global_batch"), ints.get("micro_batch")
    if gb and mb and gb % mb:
        c.problems.append(f"micro_batch: {mb} does not divide global_batch {gb}")
    if ("epochs" in raw) == ("rounds" in raw):
        c.problems.append("epochs / rounds: set exactly one of them (an integer > 0)")
    epochs = c.int_("epochs", raw["epochs"]) if "epochs" in raw else None
    rounds = c.int_("rounds", raw["rounds"]) if "rounds" in raw else None

    optimizer = c.table("optimizer", get("optimizer")) if "optimizer" in raw else None
    optimizer = _check_optimizer(c, optimizer) if optimizer is not None else {}
    data = c.table("data", get("data")) if "data" in raw else None
    data = _check_data(c, data, limits) if data is not None else {}

    verify = c.float_(
        "verify", get("verify", 0.05), 0.0, 1.0, hi_open=False, what="a fraction in [0, 1]"
    )
    ev = c.table("eval", get("eval", {}))
    ev_out = {}
    if ev is not None:
        c.unknown(ev, {"holdout", "metric"}, "eval.")
        holdout = ev.get("holdout", 0.2)
        ev_out["holdout"] = c.float_("eval.holdout", holdout, 0.0, 1.0, what="a number in [0, 1)")
        default_metric = "mse" if loss == "mse" else "accuracy"
        ev_out["metric"] = c.choice("eval.metric", ev.get("metric", default_metric), tuple(METRICS))
        if loss and ev_out["metric"] and (ev_out["metric"] == "accuracy") != (loss != "mse"):
            c.problems.append(
                f"eval.metric: '{ev_out['metric']}' does not fit loss '{loss}' "
                "(use 'accuracy' with classification losses, 'mse' with mse)"
            )
    task = data.get("task") if data.get("source") == "builtin:synthetic" else None
    if data.get("source") == "builtin:digits":
        task = "classification"
    if loss and task and (task == "classification") != (loss in CLASSIFICATION_LOSSES):
        c.problems.append(f"loss: '{loss}' does not fit {task} data from '{data['source']}'")

    scheduler = _check_scheduler(c, raw["scheduler"]) if "scheduler" in raw else ()
    clip = None
    if "clip_grad_norm" in raw:
        clip = c.float_("clip_grad_norm", raw["clip_grad_norm"], 0.0, lo_open=True,
                        what="a number > 0 (the max global gradient norm)")  # fmt: skip
    init = _check_init(c, raw["init"]) if "init" in raw else None
    placement = c.choice("placement", get("placement", "auto"), PLACEMENTS)

    if "model" in raw:
        _check_model(c, raw, shape if "input_shape" in raw else None, limits)
    if c.problems:
        raise SpecError(c.problems)
    return JobSpec(
        name=name,
        model=tuple(dict(layer) for layer in raw["model"]),  # values are validated scalars
        input_shape=tuple(shape),
        loss=loss,
        optimizer=optimizer,
        data=data,
        epochs=epochs,
        rounds=rounds,
        seed=seed,
        eval=ev_out,
        verify=float(verify),
        scheduler=scheduler,
        clip_grad_norm=clip,
        init=init,
        placement=placement,
        **ints,
    )
