"""Triton's per-model statistics (the ModelStatistics RPC): cumulative counts and durations per version.

Per request (success, fail, queue, compute_input/infer/output) the durations are the request's own; a
request's compute_infer is the run of the batch it rode in, as in Triton. Per batch size, the durations of
the runs themselves. Request figures are updated on the event loop, batch figures by the batching threads,
so only the latter need a lock. Snapshots are plain dicts: worker processes send them to the supervisor,
which sums them, so the figures cover the whole server.
"""

import threading
import time
from collections import defaultdict

from serving.proto.inference import grpc_service_pb2 as pb

REQUEST_FIELDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
BATCH_FIELDS = ("compute_input", "compute_infer", "compute_output")

Snapshot = dict  # {"last_inference": ms, "inference_count", "execution_count", "requests": {field: [count,
#                    ns]}, "batches": {size: {field: [count, ns]}}}


class VersionStatistics:
    def __init__(self) -> None:
        self.last_inference_ms = 0
        self.inference_count = 0
        self.requests = {name: [0, 0] for name in REQUEST_FIELDS}
        # The figures every success updates, in record_success's argument order.
        self._success_fields = tuple(self.requests[name] for name in REQUEST_FIELDS if name != "fail")
        self._batches: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # count, input, infer, output
        self._execution_count = 0
        self._lock = threading.Lock()

    def record_success(
        self, images: int, total_ns: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """(Event loop.) One answered request."""
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.inference_count += images
        success, queue, compute_input, compute_infer, compute_output = self._success_fields
        success[0] += 1
        success[1] += total_ns
        queue[0] += 1
        queue[1] += queue_ns
        compute_input[0] += 1
        compute_input[1] += input_ns
        compute_infer[0] += 1
        compute_infer[1] += infer_ns
        compute_output[0] += 1
        compute_output[1] += output_ns

    def record_failure(self, total_ns: int) -> None:
        """(Event loop.) One request of this version that got an error."""
        self.requests["fail"][0] += 1
        self.requests["fail"][1] += total_ns

    def record_batch(self, size: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """(Batching thread.) One model run of `size` images."""
        with self._lock:
            self._execution_count += 1
            entry = self._batches[size]
            entry[0] += 1
            entry[1] += input_ns
            entry[2] += infer_ns
            entry[3] += output_ns

    def snapshot(self) -> Snapshot:
        with self._lock:
            batches = {
                size: {name: [count, ns] for name, ns in zip(BATCH_FIELDS, rest, strict=True)}
                for size, (count, *rest) in self._batches.items()
            }
            executions = self._execution_count
        return {
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": executions,
            "requests": {name: list(pair) for name, pair in self.requests.items()},
            "batches": batches,
        }


def merge(snapshots: list[Snapshot]) -> Snapshot:
    """Sum snapshots of the same model version taken in different worker processes."""
    total: Snapshot = {
        "last_inference": max((s["last_inference"] for s in snapshots), default=0),
        "inference_count": sum(s["inference_count"] for s in snapshots),
        "execution_count": sum(s["execution_count"] for s in snapshots),
        "requests": {name: [0, 0] for name in REQUEST_FIELDS},
        "batches": {},
    }
    for s in snapshots:
        for name, (count, ns) in s["requests"].items():
            total["requests"][name][0] += count
            total["requests"][name][1] += ns
        for size, fields in s["batches"].items():
            into = total["batches"].setdefault(size, {name: [0, 0] for name in BATCH_FIELDS})
            for name, (count, ns) in fields.items():
                into[name][0] += count
                into[name][1] += ns
    return total


def to_proto(name: str, version: int, s: Snapshot) -> pb.ModelStatistics:
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=name,
        version=str(version),
        last_inference=s["last_inference"],
        inference_count=s["inference_count"],
        execution_count=s["execution_count"],
        inference_stats=pb.InferStatistics(
            **{field: duration(count=c, ns=ns) for field, (c, ns) in s["requests"].items()}
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=int(size), **{field: duration(count=c, ns=ns) for field, (c, ns) in fields.items()}
            )
            for size, fields in sorted(s["batches"].items())
        ],
    )
