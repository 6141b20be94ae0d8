"""Stopping a training run with a checkpoint at the current step: on SIGTERM or Ctrl-C to the
driver, and (Ray backend) when Ray reports that a node of the run is being preempted.

Who sends what:
- `ray job stop`: SIGTERM to the driver's process group, then SIGKILL after
  `RAY_JOB_STOP_WAIT_TIME_S` (3 s by default, read from the job's runtime_env `env_vars`). A
  checkpoint of a large model takes longer: raise it (README, "Checkpoints").
- KubeRay deleting the submitter or head pod, `kill`, a scheduler's time limit: SIGTERM, then
  SIGKILL after the pod's `terminationGracePeriodSeconds` (or the scheduler's grace).
- A terminal: Ctrl-C (SIGINT).
- A spot reclaim or node drain: Ray core marks the node as draining and Ray Train tells the
  workers (`ray.train.get_preemption_info`). The workers then write a checkpoint at once and
  keep training, as Ray recommends: when the node goes, Ray Train restarts the group from that
  checkpoint instead of one up to `train.checkpoint_every` steps older.

The first signal asks the run to stop. The step under way finishes, every rank agrees on that
step (one small all-reduce per step), a checkpoint is written there unless one just was, and
training returns. The verb then fails with `Stopped`, which the CLI prints and turns into exit
code 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C). Running the same job again
resumes at that step, exactly as if it had not stopped. A second signal ends the process at once,
as the signal would without us.

Signals reach Python only in the main thread: the handlers are installed there (`signals_stop`)
and not at all in a thread (a Tune trial), where a stop comes from Tune instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Any, Iterator, Protocol

# torch is imported where used: the StopFlag actor's process imports this module and needs none
logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# How often the workers ask Ray Train whether a node of theirs is being drained: as often as Ray
# Train's own watcher looks (its setting, 5 s by default, which Ray passes from the driver to the
# workers), since asking more often learns nothing new. Each question is a barrier of the whole
# group, so it is asked on a clock (rank 0's, shared through the per-step all-reduce) rather
# than every step.
_PREEMPTION_POLL_VARIABLE = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"
_DEFAULT_PREEMPTION_POLL_SECONDS = 5.0


class Stopped(Exception):
    """Training stopped on a signal, with a checkpoint at `step`; not an error of the job."""

    def __init__(self, signal_name: str, step: int, exit_code: int):
        self.signal_name, self.step, self.exit_code = signal_name, step, exit_code
        super().__init__(f"stopped on {signal_name} at step {step}, with a checkpoint there; run the same job again to resume")

    def __reduce__(self):
        return type(self), (self.signal_name, self.step, self.exit_code)


class StopRequest:
    """What the driver's signal handler sets: the first signal's name and number."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.signal_number: int | None = None
        self._listeners: list[Any] = []

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signal_number or signal.SIGTERM)

    def on_request(self, listener: Any) -> None:
        """Call `listener(signal_name)` when a stop is requested (at once if it already was)."""
        self._listeners.append(listener)
        if self.requested:
            listener(self.signal_name)

    def request(self, signal_number: int) -> None:
        self.signal_name, self.signal_number = signal.Signals(signal_number).name, signal_number
        for listener in self._listeners:
            listener(self.signal_name)


@contextlib.contextmanager
def signals_stop(request: StopRequest) -> Iterator[None]:
    """Inside the block, the first SIGTERM or SIGINT sets `request` (and logs what happens next);
    a second one restores the previous handlers and is delivered again, so it acts as it would
    have. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in _SIGNALS}

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler)

    def handle(number: int, frame: Any) -> None:
        if request.requested:
            logger.warning("%s again: stopping at once, without a checkpoint", signal.Signals(number).name)
            restore()
            os.kill(os.getpid(), number)
            return
        logger.warning(
            "%s: training stops after the current step, with a checkpoint there (send it again to stop at once)",
            signal.Signals(number).name,
        )
        request.request(number)

    for number in _SIGNALS:
        signal.signal(number, handle)
    try:
        yield
    finally:
        restore()


class StopCheck(Protocol):
    def should_stop(self, step: int) -> bool:
        """Called by every rank after each step (a collective where there are several ranks):
        True when training should checkpoint at `step` and return."""
        ...

    def preempted(self) -> bool:
        """Called after `should_stop` (also a collective): True once when a node of the run is
        being drained, so that a checkpoint is written now."""
        ...

    def stopped(self, step: int) -> None:
        """Called by every rank when training returns on a stop, its checkpoint at `step` written."""
        ...


class NoStop:
    """Never stops: a run in a thread (a Tune trial), or a caller that handles signals itself."""

    def should_stop(self, step: int) -> bool:
        return False

    def preempted(self) -> bool:
        return False

    def stopped(self, step: int) -> None:
        pass


class LocalStop:
    """The single-process backend: the driver's own request."""

    def __init__(self, request: StopRequest):
        self.request = request

    def should_stop(self, step: int) -> bool:
        return self.request.requested

    def preempted(self) -> bool:
        return False

    def stopped(self, step: int) -> None:
        pass  # the driver is this process: run_train_local reads the step from the run


class StopFlag:
    """A tiny Ray actor (no CPU) through which the driver's signal reaches the workers, and rank 0
    tells the driver the step it stopped at."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.step: int | None = None

    def request(self, signal_name: str) -> None:
        self.signal_name = signal_name

    def requested(self) -> str | None:
        return self.signal_name

    def stopped_at(self, step: int) -> None:
        self.step = step

    def stopped_step(self) -> int | None:
        return self.step


class RayWorkerStop:
    """Inside a Ray Train worker: rank 0 reads the driver's `StopFlag` without waiting (one
    request in flight at a time) and keeps the clock for the preemption question; one all-reduce
    per step gives every rank the same answers."""

    def __init__(self, flag: Any, rank: int, world_size: int, device: Any):
        self.flag, self.rank, self.world_size, self.device = flag, rank, world_size, device
        self._pending = None
        self._preemption_poll_seconds = float(os.environ.get(_PREEMPTION_POLL_VARIABLE, _DEFAULT_PREEMPTION_POLL_SECONDS))
        self._asked_preemption_at = time.monotonic()
        self._ask_preemption = False
        self._saved_for_preemption = False

    def _driver_requested(self) -> bool:
        import ray

        if self.flag is None:
            return False
        if self._pending is None:
            self._pending = self.flag.requested.remote()
        ready, _ = ray.wait([self._pending], timeout=0)
        if not ready:
            return False
        try:
            answer = ray.get(self._pending)
        except ray.exceptions.RayActorError as error:
            # the flag lives on the driver's node (see run_train_ray); losing it must not end training
            logger.warning("the driver's stop flag is gone (%s); training goes on without it", type(error).__name__)
            self.flag = None
            return False
        finally:
            self._pending = None
        return answer is not None

    def should_stop(self, step: int) -> bool:
        stop = ask = 0.0
        if self.rank == 0:
            stop = float(self._driver_requested())
            if time.monotonic() - self._asked_preemption_at >= self._preemption_poll_seconds:
                ask, self._asked_preemption_at = 1.0, time.monotonic()
        if self.world_size > 1:
            import torch

            decision = torch.tensor([stop, ask], device=self.device)
            torch.distributed.all_reduce(decision, op=torch.distributed.ReduceOp.MAX)
            stop, ask = decision.tolist()
        self._ask_preemption = bool(ask)
        return bool(stop)

    def stopped(self, step: int) -> None:
        if self.rank == 0 and self.flag is not None:
            import ray

            ray.get(self.flag.stopped_at.remote(step))  # waited for: the driver reads it once training returns

    def preempted(self) -> bool:
        if not self._ask_preemption or self._saved_for_preemption:
            return False
        import ray.train

        info = ray.train.get_preemption_info()  # a barrier: every rank asks on the same steps
        if info is None:
            return False
        if self.rank == 0:
            deadline = f"{max(info.deadline_ms / 1000 - time.time(), 0):.0f} s" if info.deadline_ms else "no deadline given"
            logger.warning(
                "nodes %s (ranks %s) are being preempted (%s): writing a checkpoint now",
                info.preempted_node_ids, info.preempted_ranks, deadline,
            )
        self._saved_for_preemption = True
        return True
