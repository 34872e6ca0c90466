"""A whole training iteration captured once as a CUDA graph, then replayed.

Why: the strategies with several network passes per iteration (teacher forwards, UA-MT's noisy
passes, ICT's two halves, DAN's discriminator step) issue about 1,500 small kernels per
iteration, and the GPU waits while the host launches them (benchmarks/notes/performance.md:
ICT issued 13.6 ms of kernels in a 28.5 ms step on an H200). A captured graph replays all of them
with one launch.

What is captured: the batch's device side (`BatchSampler.assemble`: gather and augment), the
strategy's `losses`, backward, the SGD update, the teacher's EMA and `after_step`. What stays on
the host: drawing the batch's indices and affines, and the schedules; their values reach the graph
through fixed device buffers filled before each replay (numbers by `fill_`, small tensors by a
copy from pinned memory), so the replayed kernels read this iteration's values.

torch's SGD bakes a Python learning rate into its kernels, so the update is written here with
foreach ops that read it from a buffer; it updates the optimiser's own momentum buffers, so
checkpoints stay plain `torch.optim.SGD` state and resume with or without graphs. Random draws
inside the graph (dropout, the teacher's input noise) come from the CUDA generator, which PyTorch
advances on every replay.

On CPU (tests) or before capture the same code runs eagerly; if capture fails, training goes on
eagerly with one warning.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from raysemi.schedules import ema_alpha

if TYPE_CHECKING:  # pragma: no cover
    from raysemi.loop import Trainer

#: eager iterations before capture: cuDNN's algorithm choices, lazy initialisations and the
#: optimisers' state must exist before a graph records the step
WARMUP_ITERATIONS = 3


@torch.no_grad()
def sgd_momentum_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lr: Tensor,
                  momentum: float, weight_decay: float) -> None:
    """`torch.optim.SGD`'s update (dampening 0, no Nesterov) with the learning rate a tensor:
    `d = g + wd * p; buf = momentum * buf + d; p -= lr * buf`. Buffers that start at zero give
    torch's first step (which copies `d` into a new buffer)."""
    d = torch._foreach_add(grads, params, alpha=weight_decay) if weight_decay else grads
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))


@torch.no_grad()
def ema_(teacher: list[Tensor], student: list[Tensor], keep: Tensor, take: Tensor) -> None:
    """`t = keep * t + take * s` with the coefficients as tensors (the loop's `ema_update`)."""
    torch._foreach_mul_(teacher, keep)
    torch._foreach_add_(teacher, torch._foreach_mul(student, take))


def set_capturable(optimizer: torch.optim.Optimizer, capturable: bool, device: torch.device) -> None:
    """Switch an Adam-like optimiser to (or from) keeping its step count on the device, which
    capture requires; moves existing step counts accordingly."""
    for group in optimizer.param_groups:
        if "capturable" in group:
            group["capturable"] = capturable
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, Tensor):
            state["step"] = step.to(device, torch.float32) if capturable else step.cpu()


class GraphedStep:
    """Runs training iterations for a `Trainer` through fixed buffers; captures them on CUDA.

    Call with the host side of an iteration; returns the strategy's outputs and `after_step`'s
    (detached tensors that the next call overwrites)."""

    def __init__(self, trainer: "Trainer", capture: bool, warmup: int = WARMUP_ITERATIONS) -> None:
        self.trainer = trainer
        self.device = trainer.device
        self.capture = capture and trainer.device.type == "cuda"
        self.warmup_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failure: str | None = None
        self.static: dict[str, Tensor] = {}  # "draw/<k>", "input/<k>", "loop/<k>"
        self.input_names: list[str] = []
        self.outputs: tuple[dict[str, Tensor], dict[str, Tensor]] = ({}, {})
        opt = trainer.optimizer
        if len(opt.param_groups) != 1 or opt.param_groups[0].get("nesterov") or opt.param_groups[0].get("dampening"):
            raise ValueError("GraphedStep supports one SGD parameter group without Nesterov or dampening")
        group = opt.param_groups[0]
        self.momentum, self.weight_decay = float(group["momentum"]), float(group["weight_decay"])
        self.params = [p for p in group["params"] if p.requires_grad]
        for p in self.params:  # torch's SGD creates them at its first step; zeros are equivalent
            if self.momentum and opt.state[p].get("momentum_buffer") is None:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        self.bufs = [opt.state[p]["momentum_buffer"] for p in self.params] if self.momentum else []
        strategy = trainer.strategy
        self.teacher_params = list(strategy.teacher.parameters()) if strategy.teacher is not None else []
        self.student_params = list(strategy.student.parameters()) if strategy.teacher is not None else []
        if self.capture:
            for extra in trainer.extra_optimizers.values():
                set_capturable(extra, True, self.device)

    # -- buffers -------------------------------------------------------------------------------
    def _fill(self, values: dict[str, float | Tensor]) -> None:
        for key, value in values.items():
            if isinstance(value, Tensor):
                buf = self.static.get(key)
                if buf is None:
                    buf = self.static[key] = torch.empty(value.shape, dtype=value.dtype, device=self.device)
                elif buf.shape != value.shape or buf.dtype != value.dtype:
                    raise ValueError(f"step input {key!r} changed from {tuple(buf.shape)} {buf.dtype} to "
                                     f"{tuple(value.shape)} {value.dtype}; a captured step needs fixed shapes")
                src = value.pin_memory() if self.device.type == "cuda" else value
                buf.copy_(src, non_blocking=True)
            else:
                buf = self.static.get(key)
                if buf is None:
                    buf = self.static[key] = torch.zeros((), dtype=torch.float32, device=self.device)
                buf.fill_(float(value))

    # -- one iteration -------------------------------------------------------------------------
    def _run(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        t, s = self.trainer, self.static
        batch = t.sampler.assemble(s["draw/idx"], s["draw/rows"], s.get("draw/theta"))
        if t.channels_last:
            batch.image = batch.image.contiguous(memory_format=torch.channels_last)
        inputs = {k: s[f"input/{k}"] for k in self.input_names}
        # autocast's cast cache must be off under capture (its cached casts would be freed)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.amp, cache_enabled=False):
            out = t.strategy.losses(batch, inputs)
        t.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        pairs = [(p, b) for p, b in zip(self.params, self.bufs or [None] * len(self.params)) if p.grad is not None]
        params = [p for p, _ in pairs]
        grads = [p.grad for p in params]
        if self.momentum:
            sgd_momentum_(params, grads, [b for _, b in pairs], s["loop/lr"], self.momentum, self.weight_decay)
        else:
            with torch.no_grad():
                if self.weight_decay:
                    grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
                torch._foreach_sub_(params, torch._foreach_mul(grads, s["loop/lr"]))
        if self.teacher_params:
            ema_(self.teacher_params, self.student_params, s["loop/ema_keep"], s["loop/ema_take"])
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.amp, cache_enabled=False):
            extra = t.strategy.after_step(batch, inputs)
        return ({k: v.detach() for k, v in out.items()}, {k: v.detach() for k, v in extra.items()})

    def __call__(self, draw: dict[str, Tensor], inputs: dict[str, float | Tensor], iteration: int,
                 lr: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if self.graph is not None and list(inputs) != self.input_names:
            raise ValueError(f"step inputs changed after capture: {self.input_names} -> {list(inputs)}; "
                             "step_inputs must give the same names every iteration")
        self.input_names = list(inputs)
        # one namespace per source, so a strategy input can never shadow the loop's own buffers
        values: dict[str, float | Tensor] = {**{f"draw/{k}": v for k, v in draw.items()},
                                             **{f"input/{k}": v for k, v in inputs.items()}, "loop/lr": lr}
        if self.teacher_params:
            alpha = ema_alpha(iteration, self.trainer.strategy.ema_decay)
            values.update({"loop/ema_keep": alpha, "loop/ema_take": 1.0 - alpha})
        self._fill(values)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if not self.capture or self.failure is not None:
            self.outputs = self._run()
        elif self.warmup_left > 0:
            self.warmup_left -= 1
            self.outputs = self._on_side_stream()
        else:
            self.outputs = self._capture()
        return self.outputs

    def _on_side_stream(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """An eager iteration on a side stream, as PyTorch asks of the iterations before capture."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = self._run()
        current.wait_stream(side)
        return out

    def _capture(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Record one iteration, then replay it (recording alone runs nothing); eager on failure."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads of the process (Ray's, in a trial) may use CUDA meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self._run()
        except Exception as err:  # noqa: BLE001 - any capture failure: the step still works eagerly
            self.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            warnings.warn(f"CUDA graph capture of the {self.trainer.config.method} step failed ({self.failure}); "
                          "training goes on without graphs (set cuda_graphs: off to silence this)", RuntimeWarning,
                          stacklevel=2)
            del graph
            _release_generator(self.device)
            torch.cuda.synchronize(self.device)
            try:
                return self._run()
            except RuntimeError as again:
                raise RuntimeError(f"CUDA graph capture of the {self.trainer.config.method} step failed "
                                   f"({self.failure}) and the eager step cannot run after it ({again}); "
                                   "rerun with cuda_graphs: off") from err
        self.graph = graph
        graph.replay()
        return outputs


def _release_generator(device: torch.device) -> None:
    """After a failed capture the CUDA generator still believes it is being captured (PyTorch
    ends that state only when capture succeeds), and every random op then fails. Give it a fresh
    copy of its own state, which is not in capture. Graphs captured earlier in this process (other
    seeds' trainers) keep advancing the old state from the same offset, so the copy starts far
    ahead of it: their draws and the eager ones must not repeat each other."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    if hasattr(generator, "graphsafe_set_state"):
        generator.graphsafe_set_state(generator.clone_state())
        try:
            generator.set_offset(generator.get_offset() + 2 ** 44)
        except Exception:  # noqa: BLE001 - an older PyTorch without offsets: no overlap guard
            pass
