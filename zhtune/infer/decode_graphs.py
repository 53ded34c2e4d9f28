"""The decode step replayed as CUDA graphs: one graph per (rows, attended keys) bucket, captured over a
torch.compile'd step.

Why not torch.compile's own CUDA graphs (mode="reduce-overhead")? Every call still goes through
dynamo's guards over the whole model and the graph trees' bookkeeping on the CPU, several hundred
microseconds to milliseconds per token while the GPU waits (each step needs the previous step's token).
Here a step is two small copies and one `graph.replay()`. The step's decoder layers are compiled once
per kind of layer (Scheduler.compile_step: one graph serves every layer of a kind; the embedding, final
norm and lm_head run eager and are recorded all the same) with dynamic rows and key lengths (rows are at
least 2, so that size 1 never gets its own compilation); each new bucket then costs a capture, not a
compilation.

A capture runs the step for real first (compilation and warm-up, on a side stream) with the inputs of
the step being served, then records it; the recorded graph is replayed for that same step. Running the
same step twice writes the same keys and values at the same cache positions, so it is harmless.
Graphs read the cache buffers at fixed addresses: when the cache is reallocated, `reset()` drops them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from zhtune.log import logger, still_running


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    positions: torch.Tensor
    kv_index: torch.Tensor
    out: torch.Tensor


class GraphedDecode:
    def __init__(self, compiled_step, device):
        self.compiled = compiled_step  # layers torch.compile'd with dynamic shapes (Scheduler.compile_step)
        self.device = device
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None

    def reset(self):
        self.graphs.clear()
        self.pool = None

    def __call__(self, ids, positions, kv_index):
        key = (ids.shape[0], kv_index.shape[0])
        entry = self.graphs.get(key)
        if entry is None:
            return self._capture(key, ids, positions, kv_index)
        entry.ids.copy_(ids)
        entry.positions.copy_(positions)
        entry.graph.replay()
        return entry.out

    def _capture(self, key, ids, positions, kv_index):
        start = time.perf_counter()
        ids, positions, kv_index = ids.clone(), positions.clone(), kv_index.clone()
        for t in (ids, positions, kv_index):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), still_running(f"capturing the decode step for {key[0]} rows x {key[1]} keys "
                                                    "(the first capture compiles it)"):
            for _ in range(2):  # compiles on the very first call; then the allocator settles
                self.compiled(ids, positions, kv_index)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.compiled(ids, positions, kv_index)
        entry = self.graphs[key] = _Graph(graph, ids, positions, kv_index, out)
        graph.replay()
        seconds = time.perf_counter() - start
        log = logger.info if seconds > 5 else logger.debug
        log(f"decode step captured for {key[0]} rows x {key[1]} keys in {seconds:.1f}s")
        return entry.out
