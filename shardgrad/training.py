"""The job runtime that worker, coordinator and `train --local` share.

Everything a micro-batch's gradient depends on is computed here and only here, so the
distributed run and the local run execute the very same code on the very same inputs:
that, plus the canonical reduction tree (core/sampling.py), is the determinism contract.
"""

import contextlib
import signal
import threading
import time
from collections.abc import Callable

import numpy as np

from .core import from_numpy, nn, optim
from .core import functional as F
from .core.clip import clip_grad_norm_
from .core.memory import keep_freed_memory
from .core.sampling import (
    add_arrays,
    epoch_permutation,
    micro_batch_rng,
    micro_batch_slice,
    split_indices,
    tree_split,
    tree_sum,
)
from .core.tensor import Tensor, bump_version, no_grad
from .datasets import check_against_model, load_dataset, resolve_data_path
from .engine import run_local, weights_digest  # noqa: F401  (re-exported)
from .jobspec import JobSpec
from .registry import LOSSES, METRICS, OPTIMIZERS, make_scheduler

# Micro-batches per stacked forward/backward: at most STACK_MAX (k gradients of the whole
# model are alive at once), and about STACK_ROWS samples, past which activations leave the
# cache and stacking gains nothing. Chunking cannot change bits: a micro-batch's bits do not
# depend on what it is stacked with (tests/test_batched.py).
STACK_MAX = 16
STACK_ROWS = 256


class DryRunError(ValueError):
    """Micro-batch 0 of a submitted job raised: the job is refused with the reason."""


class JobRuntime:
    """One job's model and data in one process, and the pure functions of (round, index)
    that the contract is made of."""

    def __init__(self, spec: JobSpec, data_root: str | None = None, verify_data: bool = True):
        keep_freed_memory()  # a step's big temporaries reuse pages (core/memory.py)
        self.spec, self.data_root = spec, data_root
        self.model = nn.build(list(spec.model), list(spec.input_shape), spec.seed)
        named = list(self.model.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.loss_fn = LOSSES[spec.loss]
        self.X, self.y = load_dataset(spec.data, data_root, verify=verify_data)
        if spec.data["source"] == "builtin:digits" and tuple(spec.input_shape) == (1, 8, 8):
            self.X = self.X.reshape(len(self.X), 1, 8, 8)  # the images, one channel, for CNNs
        out = self.model.output_shape
        n_outputs = out[0] if len(out) == 1 else None
        check_against_model(self.X, self.y, spec.input_shape, spec.loss, n_outputs)
        holdout = (spec.eval or {}).get("holdout", 0.0)
        self.train_idx, self.holdout_idx = split_indices(spec.seed, len(self.X), holdout)
        self.global_batch, self.micro_batch = spec.global_batch, spec.micro_batch
        self.n_micro = spec.global_batch // spec.micro_batch
        self.steps_per_epoch = len(self.train_idx) // spec.global_batch
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"global_batch {spec.global_batch} is larger than the training set "
                f"({len(self.train_idx)} samples after the held-out split)"
            )
        self.total_rounds = spec.rounds or spec.epochs * self.steps_per_epoch
        self._perm = (None, None)
        self._dropouts = [m for m in self.model.modules() if isinstance(m, nn.Dropout)]
        # BatchNorm: each micro-batch normalises with its own statistics and reports them
        # (mean, unbiased var) after the gradients; the engine updates the running ones.
        self.norms = [m for m in self.model.modules() if isinstance(m, nn._BatchNorm)]
        for m in self.norms:
            m.defer_running_stats = True
        self.buffers = dict(self.model.named_buffers())
        self.dry_run_s: float | None = None  # how long dry_run took, once it has run
        self._mean: list[np.ndarray] = []  # apply_step's mean gradients (its scratch)
        self._stacked: tuple = (None, None, None)  # (model, loss, whether they run stacked)

    @property
    def stacked(self) -> bool:
        """Whether micro-batches run stacked: a property of the model and loss only, never
        of k, so a micro-batch's bits do not depend on the block (or chunk) it is in."""
        model, loss, known = self._stacked  # (a walk over every module: once, not per call)
        if model is not self.model or loss is not self.loss_fn:
            known = nn.stackable(self.model) and F.has_stacked_loss(self.loss_fn)
            self._stacked = (self.model, self.loss_fn, known)
        return known

    # ---- the contract ----------------------------------------------------------------------
    def position(self, round_: int) -> tuple[int, int]:
        """(epoch, step in epoch) of round `round_` (0-based)."""
        return divmod(round_, self.steps_per_epoch)

    def sample_indices(self, round_: int, index: int) -> np.ndarray:
        epoch, step = self.position(round_)
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.spec.seed, epoch, len(self.train_idx)))
        sl = micro_batch_slice(step, index, self.global_batch, self.micro_batch)
        return self.train_idx[self._perm[1][sl]]

    def micro_batch_grad(self, round_: int, index: int) -> list[np.ndarray]:
        """Gradient of micro-batch `index` of round `round_`, with the micro-batch's loss sum
        appended as a float64 array of shape (1,); the same bits as inside any block."""
        return self.block_grad(round_, index, index + 1)

    def block_grad(self, round_: int, lo: int, hi: int, out=None) -> list[np.ndarray]:
        """Sum of micro-batches [lo, hi) by the canonical tree (a node of the round's tree),
        written into `out` if given (arrays of sum_layout()). Stackable models run up to
        stack_size() micro-batches as one forward/backward."""
        if not self.stacked:
            return tree_sum(lambda i: self.unstacked_grad(round_, i), lo, hi, out=out)
        if hi - lo > self.stack_size():  # tree_sum's own recursion: the same additions
            mid = tree_split(lo, hi)
            halves = self.block_grad(round_, lo, mid), self.block_grad(round_, mid, hi)
            return add_arrays(*halves, halves[0] if out is None else out)  # (fresh: ours)
        grads = self.stacked_grads(round_, lo, hi)  # fresh arrays, ours to sum in place
        return tree_sum(lambda i: [g[i - lo] for g in grads], lo, hi, out=out, scratch=True)

    def stack_size(self) -> int:
        """How many micro-batches one stacked pass takes at most."""
        return max(1, min(STACK_MAX, STACK_ROWS // self.micro_batch))

    def stacked_grads(self, round_: int, lo: int, hi: int) -> list[np.ndarray]:
        """Micro-batches [lo, hi) in one forward/backward over stacked (k, m, ...) arrays:
        per parameter its k micro-batch gradients (k, *shape), then the (k, 1) float64 loss
        sums. Slice i is exactly what micro-batch lo + i gives alone (stacked with k = 1)."""
        k, m = hi - lo, self.micro_batch
        idx = np.concatenate([self.sample_indices(round_, i) for i in range(lo, hi)])
        epoch, step = self.position(round_)
        rngs = None  # seeding a generator costs tens of µs: only for models that draw
        if self._dropouts:
            rngs = [micro_batch_rng(self.spec.seed, epoch, step, i) for i in range(lo, hi)]
        stack = nn.Stack(k, rngs)
        self.model.train()
        try:
            x, y = np.asarray(self.X[idx]), np.asarray(self.y[idx])  # fresh arrays: no copy
            out = self.model.stacked(from_numpy(x.reshape(k, m, *x.shape[1:])), stack)
            y = from_numpy(y.reshape(k, m, *y.shape[1:]))
            losses = F.stacked_loss(self.loss_fn, out, y) * float(m)
            losses.backward(np.ones(k, losses.dtype))
        except Exception as e:
            if k > 1:  # find the micro-batch that raises, for the FAULT a worker sends
                for i in range(lo, hi):
                    self.stacked_grads(round_, i, i + 1)
            e.micro_batch = lo
            raise
        loss_sums = losses.data.astype(np.float64).reshape(k, 1)
        return [stack.grad(p) for p in self.params] + [loss_sums]

    def unstacked_grad(self, round_: int, index: int) -> list[np.ndarray]:
        """Micro-batch `index` by its own forward/backward: the path of models with a layer
        or loss that cannot run stacked."""
        idx = self.sample_indices(round_, index)
        epoch, step = self.position(round_)
        for d in self._dropouts:
            d.generator = micro_batch_rng(self.spec.seed, epoch, step, index)
        self.model.train()
        for p in self.params:
            p.grad = None
        try:
            # X[idx] is already a fresh array (fancy indexing): wrap it, do not copy it again
            out = self.model(from_numpy(np.asarray(self.X[idx])))
            loss = self.loss_fn(out, from_numpy(np.asarray(self.y[idx]))) * float(len(idx))
            loss.backward()
        except Exception as e:
            e.micro_batch = index  # which one, for the FAULT a worker sends
            raise
        grads = [p.grad.data if p.grad is not None else np.zeros_like(p.data) for p in self.params]
        stats = [s for m in self.norms for s in m.batch_stats]
        return grads + stats + [np.array([loss.item()], np.float64)]

    def sum_layout(self) -> list[tuple[tuple, np.dtype]]:
        """(shape, dtype) of each array in a block sum: the gradients in parameter order,
        each BatchNorm's summed batch mean and unbiased variance, the loss last."""
        f64 = np.dtype(np.float64)
        stats = [((m.num_features,), f64) for m in self.norms for _ in range(2)]
        return [(p.shape, p.dtype) for p in self.params] + stats + [((1,), f64)]

    def update_running_stats(self, total: list[np.ndarray]) -> None:
        """One momentum step per round of every BatchNorm's running statistics, with the
        mean over the round's micro-batches of their batch means and unbiased variances
        (summed by the canonical tree, so the same bits for any number of workers)."""
        k = len(self.params)
        for j, m in enumerate(self.norms):
            mean, var = total[k + 2 * j], total[k + 2 * j + 1]
            m.update_running_stats(mean / self.n_micro, var / self.n_micro)

    def dry_run(self, seconds: float) -> None:
        """Forward + backward of micro-batch 0 of round 0, so what would fail on every
        worker fails at submit instead. Past `seconds` it gives up quietly (a big model is
        not an error; the workers report what the dry run did not get to see)."""
        t0 = time.perf_counter()
        try:
            with _time_limit(seconds):
                self.micro_batch_grad(0, 0)
        except _TimeUp:
            pass
        except Exception as e:  # job code: the spec's model on the spec's data
            raise DryRunError(f"micro-batch 0 of round 0 raised {type(e).__name__}: {e}") from None
        finally:
            self.dry_run_s = time.perf_counter() - t0  # placement's first hint

    # ---- weights and the optimizer step ----------------------------------------------------
    def weights(self) -> list[np.ndarray]:
        return [p.data for p in self.params]

    def set_weights(self, arrays) -> None:
        for p, a in zip(self.params, arrays, strict=True):
            np.copyto(p.data, a)
            bump_version(p)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers (BatchNorm's running statistics), named and ordered as
        torch's state_dict of the same torch.nn.Sequential."""
        return {n: np.array(t.data, copy=True) for n, t in self.model.state_dict().items()}

    def set_buffers(self, arrays: dict) -> None:
        for n, b in self.buffers.items():
            np.copyto(b, arrays[n], casting="same_kind")

    def load_init(self, job_weights: Callable[[str], dict] | None = None) -> None:
        """Start from the spec's `init` weights, if any: `file:PATH` (.npz or .safetensors)
        under the data root, or `job:ID` through `job_weights(ID)` (only the coordinator has
        finished jobs' weights). Raises ValueError naming every name / shape that does not
        fit."""
        init = self.spec.init
        if init is None:
            return
        if init.startswith("file:"):
            path = resolve_data_path(init[len("file:") :], self.data_root)
            try:
                if init.endswith(".safetensors"):  # e.g. a torch model's state_dict
                    from safetensors.numpy import load_file

                    arrays = load_file(path)
                else:
                    with np.load(path, allow_pickle=False) as z:
                        arrays = {k: z[k] for k in z.files}
            except Exception as e:  # unreadable or malformed: the job's input, not our bug
                raise ValueError(f"init '{init}': cannot read the weights file: {e}") from None
        elif job_weights is None:
            raise ValueError(
                f"init '{init}': a job's weights live on the coordinator; submit the job there, "
                "or fetch them (shardgrad fetch ID -o w.npz) and use init = 'file:w.npz'"
            )
        else:
            arrays = job_weights(init[len("job:") :])
        self.load_state(arrays, f"init '{init}'")

    def load_state(self, arrays: dict, what: str) -> None:
        """Copy a {name: array} state (as `state_dict` gives) into the model, all or nothing."""
        own = self.state_dict()
        problems = [f"missing '{n}' {list(a.shape)}" for n, a in own.items() if n not in arrays]
        problems += [
            f"unexpected '{n}' (the model has no such tensor)" for n in arrays if n not in own
        ]
        for n, a in arrays.items():
            if n not in own:
                continue
            kinds = "f" if own[n].dtype.kind == "f" else "iu"  # weights / a step counter
            if a.shape != own[n].shape or a.dtype.kind not in kinds:
                problems.append(
                    f"'{n}': {a.dtype}{list(a.shape)} does not fit the model's "
                    f"{own[n].dtype}{list(own[n].shape)}"
                )
        if problems:
            raise ValueError(
                f"{what} does not fit the model (names and shapes as `shardgrad fetch` "
                "writes them):\n  " + "\n  ".join(problems)
            )
        self.set_weights([arrays[n] for n in self.names])
        self.set_buffers(arrays)

    def make_optimizer(self) -> optim.Optimizer:
        hyper = {k: v for k, v in self.spec.optimizer.items() if k != "type"}
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        return OPTIMIZERS[self.spec.optimizer["type"]][0](self.params, **hyper)

    def make_scheduler(self, opt: optim.Optimizer):
        return make_scheduler(opt, self.spec.scheduler)

    def apply_step(
        self, opt: optim.Optimizer, total: list[np.ndarray], n_samples: int, row=None
    ) -> float:
        """Mean gradient = summed gradient / samples; clipped if the spec says so; one
        optimizer step. Returns mean loss (and puts `grad_norm` in `row` when clipping)."""
        if len(self._mean) != len(self.params):  # where the mean gradients go, step after step
            self._mean = [np.empty_like(p.data) for p in self.params]
        for p, g, mean in zip(self.params, total[: len(self.params)], self._mean, strict=True):
            if g.dtype == p.dtype:  # (the same bits as dividing into a fresh array)
                p.grad = Tensor._wrap(np.divide(g, n_samples, out=mean))
            else:
                p.grad = Tensor._wrap(np.divide(g, n_samples).astype(p.dtype, copy=False))
        if self.spec.clip_grad_norm is not None:
            norm = clip_grad_norm_(self.params, self.spec.clip_grad_norm)
            if row is not None:
                row["grad_norm"] = norm
        opt.step()
        opt.zero_grad()
        return float(total[-1][0]) / n_samples

    def group_end(self, round_: int) -> bool:
        """Whether the optimizer steps after round `round_` (accumulate_steps, last round)."""
        return (round_ + 1) % self.spec.accumulate_steps == 0 or round_ + 1 == self.total_rounds

    def group_samples(self, round_: int) -> int:
        """Samples in the accumulation group that ends at round `round_`."""
        first = round_ - round_ % self.spec.accumulate_steps
        return (round_ + 1 - first) * self.global_batch

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        idx = self.holdout_idx if len(self.holdout_idx) else self.train_idx
        metric = (self.spec.eval or {}).get("metric", "accuracy")
        self.model.eval()
        with no_grad():
            out = self.model(from_numpy(np.asarray(self.X[idx]))).data
        self.model.train()
        return {metric: METRICS[metric](out, self.y[idx])}


def train_local(
    spec: JobSpec,
    data_root: str | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The whole job in one process, no sockets: the reference a distributed run must
    equal bit for bit. Returns (final state_dict, per-round metrics)."""
    rt = JobRuntime(spec, data_root)
    rt.load_init()
    engine = run_local(rt, on_round)
    return engine.rt.state_dict(), engine.metrics


class _TimeUp(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _TimeUp in this thread after `seconds` (main thread only; elsewhere no limit)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def up(*_):
        raise _TimeUp

    old = signal.signal(signal.SIGALRM, up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
