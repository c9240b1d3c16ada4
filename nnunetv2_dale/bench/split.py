"""Where a training epoch's time goes: nnU-Net's ``run_training`` loop, run step by step with
timers (``benchmarks/epoch_cost.py``).

Per training iteration: the wait for the next batch (host), the whole ``train_step`` (host wall
time; nnU-Net's step ends with ``loss.cpu()``, so it is synchronised with the device), and on the
device (CUDA events; wall clock on a CPU) the network's forward pass (hooks on the network), the
loss (every call of ``trainer.loss``), DALE's own work (``dale_loss`` without the loss calls
inside it, plus ``update_memory``) and the optimizer step (optimizer hooks). What is left of the
step is the backward pass, gradient scaling and clipping, the batch's transfer and host overhead.
Per epoch: its start, the training loop, ``on_train_epoch_end``, validation and ``on_epoch_end``
(checkpoints, snapshots, progress.png).
"""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Callable

import torch

PARTS = ("wait", "step", "forward", "loss", "dale", "optimizer", "backward_etc")


class _Sections:
    """Named start/end marks: CUDA events on a GPU (read after the step has synchronised), the
    wall clock on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[tuple[str, object, object]] = []
        self._open: dict[str, object] = {}

    def start(self, name: str) -> None:
        self._open[name] = self._mark()

    def end(self, name: str) -> None:
        if name in self._open:
            self.marks.append((name, self._open.pop(name), self._mark()))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def collect(self) -> dict[str, float]:
        """Milliseconds per section name, summed; clears the marks."""
        out: dict[str, float] = defaultdict(float)
        for name, a, b in self.marks:
            if self.cuda:
                b.synchronize()
                out[name] += a.elapsed_time(b)
            else:
                out[name] += (b - a) * 1000
        self.marks, self._open = [], {}
        return out


def instrument(trainer) -> _Sections:
    """Hooks and wrappers on an initialised trainer (after ``on_train_start``)."""
    sections = _Sections(trainer.device.type == "cuda")
    state = {"in_step": False, "in_dale": False}

    def timed(name: str, fn: Callable, flag: str | None = None) -> Callable:
        def wrapper(*args, **kwargs):
            if not state["in_step"]:
                return fn(*args, **kwargs)
            label = f"{name}_in_dale" if name == "loss" and state["in_dale"] else name
            sections.start(label)
            if flag:
                state[flag] = True
            try:
                return fn(*args, **kwargs)
            finally:
                if flag:
                    state[flag] = False
                sections.end(label)
        return wrapper

    net = trainer.network
    net.register_forward_pre_hook(lambda *a: sections.start("forward") if state["in_step"] else None)
    net.register_forward_hook(lambda *a: sections.end("forward") if state["in_step"] else None)
    trainer.optimizer.register_step_pre_hook(lambda *a: sections.start("optimizer") if state["in_step"] else None)
    trainer.optimizer.register_step_post_hook(lambda *a: sections.end("optimizer") if state["in_step"] else None)
    trainer.loss = timed("loss", trainer.loss)
    for name in ("dale_loss", "update_memory"):
        if hasattr(trainer, name):
            setattr(trainer, name, timed(name, getattr(trainer, name), "in_dale" if name == "dale_loss" else None))
    train_step = trainer.train_step

    def step(batch):
        state["in_step"] = True
        try:
            return train_step(batch)
        finally:
            state["in_step"] = False
    trainer.train_step = step
    return sections


def _iteration_parts(wait_ms: float, step_ms: float, s: dict[str, float]) -> dict[str, float]:
    loss = s.get("loss", 0.0) + s.get("loss_in_dale", 0.0)
    dale = s.get("dale_loss", 0.0) - s.get("loss_in_dale", 0.0) + s.get("update_memory", 0.0)
    parts = {"wait": wait_ms, "step": step_ms, "forward": s.get("forward", 0.0), "loss": loss, "dale": dale,
             "optimizer": s.get("optimizer", 0.0)}
    parts["backward_etc"] = step_ms - parts["forward"] - loss - dale - parts["optimizer"]
    return parts


def run_training_split(trainer) -> list[dict]:
    """nnU-Net 2.8.1's ``run_training``, timed: one dict per epoch (seconds of each stage, the
    median milliseconds of each iteration part)."""
    trainer.on_train_start()
    sections = instrument(trainer)
    epochs = []
    for _ in range(trainer.current_epoch, trainer.num_epochs):
        t0 = time.perf_counter()
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        t1 = time.perf_counter()
        outputs, iters = [], []
        for _ in range(trainer.num_iterations_per_epoch):
            a = time.perf_counter()
            batch = next(trainer.dataloader_train)
            b = time.perf_counter()
            outputs.append(trainer.train_step(batch))
            c = time.perf_counter()
            iters.append(_iteration_parts((b - a) * 1000, (c - b) * 1000, sections.collect()))
        t2 = time.perf_counter()
        trainer.on_train_epoch_end(outputs)
        t3 = time.perf_counter()
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val = [trainer.validation_step(next(trainer.dataloader_val))
                   for _ in range(trainer.num_val_iterations_per_epoch)]
            trainer.on_validation_epoch_end(val)
        t4 = time.perf_counter()
        trainer.on_epoch_end()
        t5 = time.perf_counter()
        epochs.append({"epoch_s": t5 - t0, "start_s": t1 - t0, "train_loop_s": t2 - t1, "train_epoch_end_s": t3 - t2,
                       "validation_s": t4 - t3, "epoch_end_s": t5 - t4,
                       "iteration_ms": {p: statistics.median(i[p] for i in iters) for p in PARTS},
                       "iteration_mean_ms": {p: statistics.fmean(i[p] for i in iters) for p in PARTS}})
    trainer.on_train_end()
    return epochs
