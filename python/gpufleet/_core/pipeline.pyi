"""
Pipeline core: bounded queues, worker clocks, stage statistics
"""
from __future__ import annotations
import collections.abc
import typing
__all__: list[str] = ['Monitor', 'Queue', 'QueueCancelled', 'QueueClosed', 'StageStats', 'WorkerClock', 'limiting_stage', 'now_ns']
class QueueClosed(Exception):
    """
    The queue is closed and empty: the upstream stages have finished.
    """
class QueueCancelled(Exception):
    """
    The pipeline was cancelled (Ctrl-C or a failing stage).
    """
class WorkerClock:
    """
    Time accounting of one worker: busy, starved, blocked.
    """
    def __init__(self, max_spans: typing.SupportsInt | typing.SupportsIndex = 20000) -> None:
        ...
    def finish(self) -> None:
        ...
    def spans(self) -> list:
        ...
    def start(self) -> None:
        ...
    def switch_to(self, state: str) -> None:
        ...
    def totals(self) -> dict:
        ...
    @property
    def dropped_spans(self) -> int:
        ...
    @property
    def state(self) -> str:
        ...
class Queue:
    """
    A bounded queue of Python objects; blocking waits release the GIL.
    """
    def __init__(self, capacity: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def __len__(self) -> int:
        ...
    def cancel(self) -> None:
        ...
    def close(self) -> None:
        ...
    def drain(self) -> list:
        ...
    def get(self, clock: WorkerClock = None, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> typing.Any:
        """
        Takes the next item, waiting for one (charged to `clock` as starved). Raises QueueClosed once closed and empty, QueueCancelled, or TimeoutError.
        """
    def producer_done(self) -> bool:
        ...
    def put(self, item: typing.Any, clock: WorkerClock = None, timeout: typing.SupportsFloat | typing.SupportsIndex | None = None) -> None:
        """
        Puts an item, waiting for room (charged to `clock` as blocked). Raises QueueClosed, QueueCancelled or TimeoutError.
        """
    def set_producers(self, n: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def cancelled(self) -> bool:
        ...
    @property
    def capacity(self) -> int:
        ...
    @property
    def closed(self) -> bool:
        ...
    @property
    def high_water(self) -> int:
        ...
    @property
    def total_got(self) -> int:
        ...
    @property
    def total_put(self) -> int:
        ...
class StageStats:
    """
    Counters of one stage.
    """
    def __init__(self, name: str, workers: typing.SupportsInt | typing.SupportsIndex, max_spans_per_worker: typing.SupportsInt | typing.SupportsIndex = 20000) -> None:
        ...
    def add_batch(self, size: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def add_errors(self, n: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def add_items_in(self, n: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def add_items_out(self, n: typing.SupportsInt | typing.SupportsIndex = 1) -> None:
        ...
    def clock(self, worker: typing.SupportsInt | typing.SupportsIndex) -> WorkerClock:
        ...
    def totals(self) -> dict:
        ...
    def utilization(self) -> float:
        ...
    @property
    def batch_items(self) -> int:
        ...
    @property
    def batches(self) -> int:
        ...
    @property
    def errors(self) -> int:
        ...
    @property
    def items_in(self) -> int:
        ...
    @property
    def items_out(self) -> int:
        ...
    @property
    def mean_batch_size(self) -> float:
        ...
    @property
    def name(self) -> str:
        ...
    @property
    def workers(self) -> int:
        ...
class Monitor:
    """
    Samples queue depths and stage counters on a C++ thread.
    """
    def __init__(self, interval: typing.SupportsFloat | typing.SupportsIndex = 0.05, max_samples: typing.SupportsInt | typing.SupportsIndex = 4096) -> None:
        ...
    def add_queue(self, name: str, queue: Queue) -> int:
        ...
    def add_stage(self, stage: StageStats) -> None:
        """
        Adds two probes: '<name>.items_out' and '<name>.busy_s'.
        """
    def samples(self) -> tuple[list, list]:
        ...
    def start(self) -> None:
        ...
    def stop(self) -> None:
        ...
    @property
    def interval(self) -> float:
        ...
    @property
    def names(self) -> list[str]:
        ...
    @property
    def start_ns(self) -> int:
        ...
def limiting_stage(stages: collections.abc.Sequence[StageStats]) -> int:
    """
    Index of the stage whose workers were busiest (-1 if none ran).
    """
def now_ns() -> int:
    """
    Nanoseconds on the monotonic clock the pipeline statistics use.
    """
