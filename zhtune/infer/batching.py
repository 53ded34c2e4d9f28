"""Continuous batching for the `pt` backend: one background thread steps every active request together
over a slotted static KV cache, so a short reply frees its slot for the next prompt at once.

Why not transformers' own continuous batching (generation/continuous_batching, transformers 5.x): its
paged eager attention (integrations/eager_paged.py) drops the `softcap` argument, paged sdpa raises on
it, and its decode fast path is switched off for sliding-window models (continuous_api.py: "Disable the
decode path if the model has sliding window attention"). Gemma 2 needs both, exactly. Here the model's
own attention function runs (eager with softcap for Gemma 2), over a cache we index ourselves:

- `SlotCache`: per layer, K and V buffers of [slots, kv_heads, length, head_dim]. Row r of the batch is
  slot r; each row writes its new keys at its own positions and attends to positions <= its own
  (and > position - sliding_window on sliding layers), through a 4-D additive mask per layer type, the
  same 0 / finfo.min mask transformers builds. Stale entries beyond a row's position are masked out.
- Prefill: waiting requests into free slots, several in one forward (up to `prefill_tokens` padded
  tokens), with its decoder layers compiled (`compile_prefill`, on with CUDA graphs) or eager; logits of
  each prompt's last token only.
- Decode: every active slot in one forward of [rows, 1] tokens. Rows are bucketed to a power of two
  (slots are handed out lowest first) and attended keys to a multiple of `granularity`, so the compiled
  step sees few shapes and never one per prompt length. On CUDA the step is replayed as CUDA graphs
  (decode_graphs.py) over `Scheduler.compile_step`: each decoder layer torch.compile'd on its own with
  dynamic rows and key lengths, so that one compiled graph serves every layer of a kind (compile time
  grows with the kinds of layers, not with their number) and every shape; the embedding, final norm,
  lm_head and softcap run eager inside the recorded graph. The one-time warm-up is logged.
- Greedy runs: while every active request decodes greedily, several steps run back to back (each fed the
  previous step's argmax on the device) with one host read at the end (`greedy_run`, `greedy_run_waiting`).
- Token choice per request: greedy argmax on float32 logits (as `generate`), or repetition penalty,
  temperature, top-k, top-p and multinomial with the request's own seeded generator.

Thread safety: `submit` may be called from any thread; the model only ever runs on the scheduler
thread. A request that fails (at admission or prefill) raises in its own caller; a failing decode step
fails the requests that were in it and the loop goes on. A cancelled request frees its slot at the
next step.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import torch

from zhtune.env import env_switch
from zhtune.infer.attention import grouped_attention, register as register_grouped_attention
from zhtune.infer.decode_graphs import GraphedDecode
from zhtune.log import logger, still_running
from zhtune.models.parts import decoder_layers

END = object()  # put on a stream's queue once the request is finished


# -- requests --------------------------------------------------------------------------------------

@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stream: bool = False
    on_done: object = None  # callable(request), called on the scheduler thread when finished or failed
    # -- state, written by the scheduler thread -----------------------------------------------------
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    error: BaseException | None = None
    slot: int | None = None
    position: int = 0  # where the next token's key is written
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    submitted_at: float = field(default_factory=time.perf_counter)

    def __post_init__(self):
        self.tokens: queue.Queue = queue.Queue()  # streams: lists of new ids, then END or an exception
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.generator = None

    @property
    def argmax_only(self) -> bool:
        """Greedy without a repetition penalty: the next token is the logits' argmax."""
        return self.greedy and self.repetition_penalty == 1.0

    def cancel(self):
        self.cancelled.set()

    def result(self, timeout: float | None = None) -> list[int]:
        self.done.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.generated


# -- the cache -------------------------------------------------------------------------------------

class SlotCache:
    """K/V buffers [slots, kv_heads, length, head_dim] per layer, grown (with their contents) on demand."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype, device):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.slots = self.length = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def ensure(self, slots: int, length: int) -> bool:
        """At least `slots` x `length`; True when the buffers were (re)allocated."""
        if slots <= self.slots and length <= self.length:
            return False
        slots, length = max(slots, self.slots), max(length, self.length)
        # one spare position, never attended: a slice of attended keys is then never the whole (contiguous)
        # buffer, so a compiled step sees one memory layout for every rows x keys shape (no recompilation)
        shape = (slots, self.kv_heads, length + 1, self.head_dim)
        keys, values = [], []
        for i in range(self.num_layers):
            k = torch.zeros(shape, dtype=self.dtype, device=self.device)
            v = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if self.slots:
                k[:self.slots, :, :self.length] = self.keys[i][:, :, :self.length]
                v[:self.slots, :, :self.length] = self.values[i][:, :, :self.length]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.slots, self.length = slots, length
        if self.device.type == "cuda":
            self.mark_static()
        return True

    def mark_static(self) -> None:
        """Tell torch.compile the buffers keep their addresses (CUDA graphs then need no copies of them).
        guard=False, explicitly: a guarded address would make each layer's buffers a recompilation of the
        per-layer compiled decode step (torch's default was True in older releases)."""
        for t in self.keys + self.values:
            torch._dynamo.mark_static_address(t, guard=False)


class CacheView:
    """What the model's attention layers see for one forward: the cache rows `slots` (or rows 0..n when
    None: a view, no copy), each row writing its new keys at `positions` and reading the first `kv_len`
    positions."""

    is_compileable = True

    def __init__(self, cache: SlotCache, positions: torch.Tensor, kv_len, slots: torch.Tensor | None = None):
        self.cache, self.positions, self.kv_len, self.slots = cache, positions, kv_len, slots
        rows = torch.arange(positions.shape[0], device=positions.device) if slots is None else slots
        self.rows = rows[:, None].expand_as(positions)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        _write(keys, values, self.rows, self.positions, key_states, value_states)
        if self.slots is None:
            n = self.positions.shape[0]
            return keys[:n, :, :self.kv_len], values[:n, :, :self.kv_len]
        return keys[self.slots, :, :self.kv_len], values[self.slots, :, :self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:  # only asked when no position_ids are given
        raise RuntimeError("CacheView needs explicit position_ids")

    def layer(self, layer_idx: int, kv_index: torch.Tensor) -> "LayerCache":
        """Layer `layer_idx`'s share of this view, for a compiled decoder layer."""
        return LayerCache(self.cache.keys[layer_idx], self.cache.values[layer_idx], self.rows, self.positions,
                          kv_index, self.slots)


class LayerCache:
    """One layer's K/V buffers as a cache, for a decoder layer compiled on its own: `update` ignores the
    layer index it is given and the attended length is `kv_index`'s size (a tensor dimension, dynamic),
    so the compiled layer depends on no per-layer or per-step Python int and one compiled graph serves
    every layer of a kind, every rows x keys shape and cache size."""

    is_compileable = True

    def __init__(self, keys, values, rows, positions, kv_index, slots=None):
        self.keys, self.values, self.rows, self.positions, self.kv_index = keys, values, rows, positions, kv_index
        self.slots = slots  # the prefill's cache rows (None: rows 0..n, a decode step)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys, self.values
        _write(keys, values, self.rows, self.positions, key_states, value_states)
        kv_len = self.kv_index.shape[0]
        if self.slots is not None:
            return keys[self.slots, :, :kv_len], values[self.slots, :, :kv_len]
        n = self.positions.shape[0]
        return keys[:n, :, :kv_len], values[:n, :, :kv_len]


def _write(keys, values, rows, positions, key_states, value_states) -> None:
    """A forward's new keys and values into the cache buffers, each row at its positions."""
    keys[rows, :, positions] = key_states.transpose(1, 2).to(keys.dtype)
    values[rows, :, positions] = value_states.transpose(1, 2).to(values.dtype)


# -- token choice ----------------------------------------------------------------------------------

def choose_token(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """One row of float32 logits [vocab] -> the next token id (0-d tensor), as `generate` would pick it:
    repetition penalty, then (sampling) temperature, top-k, top-p, multinomial."""
    if request.repetition_penalty != 1.0:
        seen = torch.tensor(request.prompt + request.generated, device=logits.device)
        score = logits.gather(0, seen)
        score = torch.where(score < 0, score * request.repetition_penalty, score / request.repetition_penalty)
        logits = logits.scatter(0, seen, score)
    if request.greedy:
        return logits.argmax()
    logits = logits / request.temperature
    if request.top_k > 0:
        kth = torch.topk(logits, min(request.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if request.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - request.top_p)
        remove[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(remove.scatter(0, order, remove), -float("inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=request.generator)[0]


# -- the scheduler ---------------------------------------------------------------------------------

def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


class Scheduler:
    """Continuous batching over a `SlotCache` for one model. See the module docstring."""

    def __init__(self, model, *, max_slots: int = 8, max_len: int | None = None, granularity: int | None = None,
                 compile: str | bool | None = None, cache_budget_bytes: int | None = None,
                 prefill_tokens: int | None = None, greedy_run: int = 8, greedy_run_waiting: int = 4,
                 one_row_autotune: bool | None = None, fuse_weights: bool = False,
                 compile_prefill: bool | None = None):
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = self.model.config
        self.config = config.get_text_config() if hasattr(config, "get_text_config") else config
        param = next(self.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.cache = SlotCache(c.num_hidden_layers, c.num_key_value_heads, head_dim, self.dtype, self.device)
        self.max_slots = max_slots
        self.max_len = max_len
        on_gpu = self.device.type == "cuda"
        self.granularity = granularity or (256 if on_gpu else 32)
        if compile is None:
            compile = os.environ.get("ZHTUNE_PT_COMPILE", "graphs" if on_gpu else "0")
        self.compile_mode = None if compile in (False, "0", "", "none", "off") else (
            "graphs" if compile is True else str(compile))
        if self.compile_mode == "graphs" and not on_gpu:
            self.compile_mode = "default"  # CUDA graphs need CUDA: compiled step only
        if cache_budget_bytes is None:  # the KV cache takes at most this much (fewer slots when replies are long)
            cache_budget_bytes = int(torch.cuda.mem_get_info(self.device)[0] * 0.6) if on_gpu else 2 << 30
        self.cache_budget = cache_budget_bytes
        self.layer_types = sorted(set(getattr(c, "layer_types", None) or ["full_attention"]))
        self.sliding_window = getattr(c, "sliding_window", None)
        self._cache_kwarg = cache_kwarg(self.model)
        register_grouped_attention()
        self._decode = self._forward_decode
        self._compiled = None
        self._graphs: GraphedDecode | None = None
        # CUDA graphs: a single row decodes through a step of its own, compiled for exactly one row with
        # inductor's coordinate-descent tuning (ONE_ROW_OPTIONS; batch 1 on the H200, weights fused: 158.7
        # tokens/s against 153.0 as two rows in the same run, benchmarks/RESULTS.md); ZHTUNE_PT_ONE_ROW_AUTOTUNE=0
        # turns it off.
        # Without it, at least 2 rows, so that the dynamic-rows step is never specialised to 1 (as one row
        # through cuBLAS it was no faster than two).
        graphs = self.compile_mode == "graphs" and on_gpu
        # fuse_weights (the engine of infer/eval/deploy, which owns its model): with CUDA graphs, gate/up and
        # q/k/v each read as one weight (zhtune/infer/fused_weights.py; same tokens; batch 1 on the H200 +9%
        # under the earlier one-row options, +0.5% under the current ones, 2 rows 153.0 against 140.2 tokens/s
        # unfused in an earlier run); ZHTUNE_PT_FUSED_WEIGHTS=0 turns it off. The model's forward changes for
        # everything that runs it afterwards (same arithmetic), its weights become views of the fused ones.
        self.fused_layers = 0
        if fuse_weights and graphs and env_switch("ZHTUNE_PT_FUSED_WEIGHTS", True):
            from zhtune.infer.fused_weights import fuse_gate_up, fuse_qkv
            self.fused_layers = fuse_gate_up(self.model) + fuse_qkv(self.model)
            if self.fused_layers:
                logger.info(f"decode step: gate/up and q/k/v read as one weight ({self.fused_layers} blocks fused)")
        if one_row_autotune is None:
            one_row_autotune = env_switch("ZHTUNE_PT_ONE_ROW_AUTOTUNE", True)
        self.one_row_autotune = bool(one_row_autotune) and graphs
        self.min_rows = 2 if graphs and not self.one_row_autotune else 1
        self._one_row_used = False  # a one-row step has run (its graph exists when compiling)
        # compile_prefill (on by default with CUDA graphs; ZHTUNE_PT_COMPILE_PREFILL=0 turns it off): the
        # prefill's decoder layers run through a torch.compile of their own (dynamic rows, prompt and key
        # lengths; no CUDA graphs), instead of eager: the H200 profile of a batched run spent 1.98 of its 9.70 s
        # GPU time in eager elementwise kernels, nearly all the prefill's; compiled, the quick batched workload
        # ran 1,805.3 new tokens/s against 1,295.9 eager in one run (20 s of compilation beforehand).
        if compile_prefill is None:
            compile_prefill = graphs and env_switch("ZHTUNE_PT_COMPILE_PREFILL", True)
        self.compile_prefill = bool(compile_prefill)
        self._prefill_layer = None  # the compiled per-layer function of the prefill, built on first use
        self._prefill_compiled_once = False
        # padded prompt tokens per prefill forward
        self.prefill_tokens = prefill_tokens or (8192 if on_gpu else 1024)
        # greedy decode steps run back to back, their tokens read on the host once per run (see _greedy_run)
        self.greedy_run = greedy_run
        self.greedy_run_waiting = greedy_run_waiting
        self.pending: list[Request] = []
        self.active: dict[int, Request] = {}
        self.jobs: list[tuple] = []
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self._closing = False
        self.steps = 0
        self.stats = {"decode_steps": 0, "decode_tokens": 0, "decode_reads": 0, "prefill_tokens": 0,
                      "prefill_forwards": 0}

    # -- public, any thread ---------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        with self.cond:
            self._start()
            self.pending.append(request)
            self.cond.notify()
        return request

    def run_exclusive(self, fn):
        """Run fn() on the scheduler thread between steps (the model is not in use); its result or error."""
        box: dict = {}
        done = threading.Event()
        with self.cond:
            self._start()
            self.jobs.append((fn, box, done))
            self.cond.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def ensure_slots(self, n: int):
        with self.cond:
            self.max_slots = max(self.max_slots, n)

    def discard_compiled(self) -> None:
        """Drop the compiled decode step and its CUDA graphs, on the scheduler thread: after the model's
        modules or the compile options changed (they traced the old ones, the graphs hold old addresses).
        The next decode step compiles again."""
        def discard():
            torch._dynamo.reset()
            self._compiled, self._graphs, self._decode = None, None, self._forward_decode
            self._prefill_layer, self._prefill_compiled_once = None, False
        self.run_exclusive(discard)

    def warm_up(self, rows=(1,), slots: int | None = None, length: int | None = None, all_lengths: bool = False) -> float:
        """Size the cache and compile the decode step now (when compiling), logged; with compile_prefill,
        the prefill too. Seconds spent. `all_lengths`: also record every key-length bucket up to the cache
        length (benchmarks)."""
        return self.run_exclusive(lambda: self._warm_up(rows, slots, length, all_lengths) + self._warm_up_prefill())

    def warm_up_prefill(self) -> float:
        """Compile the prefill now (compile_prefill on, not yet compiled, no request running), logged."""
        return self.run_exclusive(self._warm_up_prefill)

    # -- the loop, scheduler thread -------------------------------------------------------------
    def _start(self):
        if self.thread is None or not self.thread.is_alive():
            first = self.thread is None
            self._closing = False
            self.thread = threading.Thread(target=self._loop, daemon=True, name="zhtune-batching")
            self.thread.start()
            if first:  # stopped before the interpreter finalizes: a daemon thread still inside a torch op
                atexit.register(_close_at_exit, weakref.ref(self))  # then can abort the process (exit -6)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the scheduler thread after its step in progress and wait for it; requests still waiting or
        running end as cancelled. A later submit starts the thread again."""
        thread = self.thread
        if thread is None or not thread.is_alive():
            return
        with self.cond:
            self._closing = True
            self.cond.notify_all()
        thread.join(timeout)

    def _loop(self):
        with torch.no_grad():
            while True:
                with self.cond:
                    while not (self.pending or self.active or self.jobs or self._closing):
                        self.cond.wait()
                    closing = self._closing
                    jobs, self.jobs = self.jobs, []
                    if closing:
                        waiting, self.pending = self.pending, []
                if closing:
                    self._shut(jobs, waiting)
                    return
                for fn, box, done in jobs:
                    try:
                        box["value"] = fn()
                    except BaseException as e:  # noqa: BLE001 - raised in the caller
                        box["error"] = e
                    done.set()
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.active:
                        self._step()
                except BaseException as e:  # noqa: BLE001 - fail the requests in the step, keep serving
                    logger.warning(f"generation step failed ({type(e).__name__}: {e}); "
                                   f"failing the {len(self.active)} request(s) in it")
                    for request in list(self.active.values()):
                        self._finish(request, error=e)

    def _shut(self, jobs, waiting: list[Request]) -> None:
        """Closing: jobs fail, waiting and running requests end as cancelled."""
        for _, box, done in jobs:
            box["error"] = RuntimeError("the generation engine was closed")
            done.set()
        for request in waiting + list(self.active.values()):
            self._finish(request, reason="cancelled")

    def _drop_cancelled(self):
        for request in list(self.active.values()):
            if request.cancelled.is_set():
                self._finish(request, reason="cancelled")
        with self.cond:
            gone = [r for r in self.pending if r.cancelled.is_set()]
            self.pending = [r for r in self.pending if not r.cancelled.is_set()]
        for request in gone:
            self._finish(request, reason="cancelled")

    def _slot_limit(self) -> int:
        limit = self.max_slots
        if self.cache_budget and self.cache.length:
            limit = min(limit, max(1, self.cache_budget // (self.cache.length * self.cache.bytes_per_token)))
        return limit

    def _admit(self):
        """Prefill waiting requests into free slots, several in one forward (up to `prefill_tokens`
        padded tokens), in arrival order."""
        while True:
            with self.cond:
                if not self.pending:
                    return
                free = [s for s in range(self._slot_limit()) if s not in self.active]
                if not free:
                    return
                group, width = [], 0
                while self.pending and len(group) < len(free):
                    wider = max(width, len(self.pending[0].prompt))
                    if group and wider * (len(group) + 1) > self.prefill_tokens:
                        break
                    group.append(self.pending.pop(0))
                    width = wider
            self._prefill(group, free[:len(group)])

    def _need(self, request: Request) -> int:
        need = len(request.prompt) + request.max_new_tokens
        return min(need, self.max_len) if self.max_len else need

    def _check_prompt(self, request: Request):
        n = len(request.prompt)
        if n == 0:
            raise ValueError("empty prompt: nothing to generate from")
        if self.max_len and n >= self.max_len:
            raise ValueError(f"the prompt has {n} tokens; this model takes at most {self.max_len} "
                             "(prompt + reply)")

    def _grow_cache(self, slots: int, length: int) -> bool:
        """The cache at least `slots` x `length`; True when it was reallocated (the CUDA graphs recorded with the
        old buffers are dropped then)."""
        grown = self.cache.ensure(slots, length)
        if grown and self._graphs is not None:
            self._graphs.reset()
        return grown

    def _prefill(self, group: list[Request], slots: list[int]):
        """One forward over the prompts of `group` (right-padded: a row's padding writes keys past its
        prompt, which stay masked until its own decode steps overwrite them), each into its slot."""
        admitted = []
        for request, slot in zip(group, slots):
            try:
                self._check_prompt(request)
            except ValueError as e:  # this request's own failure
                self._finish(request, error=e)
                continue
            admitted.append((request, slot))
        if not admitted:
            return
        length = _round_up(max(self._need(r) for r, _ in admitted), self.granularity)
        if self.max_len:
            length = min(length, _round_up(self.max_len, self.granularity))
        top = max(slot for _, slot in admitted) + 1
        capacity = self.max_slots
        if self.cache_budget:
            capacity = min(capacity, max(1, self.cache_budget // (max(length, self.cache.length) * self.cache.bytes_per_token)))
        if self._grow_cache(max(top, capacity), length):
            logger.info(f"generation cache: {self.cache.slots} slots x {self.cache.length} tokens "
                        f"({self.cache.slots * self.cache.length * self.cache.bytes_per_token / 2**30:.2f} GiB)")
        now = time.perf_counter()
        for request, slot in admitted:
            request.slot, request.admitted_at = slot, now
            if request.seed is not None:
                request.generator = torch.Generator(device=self.device).manual_seed(request.seed)
            self.active[slot] = request
        try:
            self._prefill_rows(admitted)
        except BaseException as e:  # noqa: BLE001 - the group's failure, not the scheduler's
            if len(admitted) == 1:
                self._finish(admitted[0][0], error=e)
                return
            for one in admitted:  # one bad prompt (say an id outside the vocabulary) fails alone
                try:
                    self._prefill_rows([one])
                except BaseException as e:  # noqa: BLE001
                    self._finish(one[0], error=e)

    def _prefill_rows(self, admitted: list[tuple[Request, int]]):
        width = max(len(r.prompt) for r, _ in admitted)
        ids = torch.tensor([r.prompt + [0] * (width - len(r.prompt)) for r, _ in admitted], device=self.device)
        positions = torch.arange(width, device=self.device)[None].expand(len(admitted), width)
        lasts = sorted({len(r.prompt) - 1 for r, _ in admitted})
        slot_index = torch.tensor([slot for _, slot in admitted], device=self.device)
        logits = self._forward(ids, positions, self._kv_bucket(width), slot_index,
                               torch.tensor(lasts, device=self.device))
        self.stats["prefill_tokens"] += sum(len(r.prompt) for r, _ in admitted)
        self.stats["prefill_forwards"] += 1
        for row, (request, _) in enumerate(admitted):
            request.position = len(request.prompt)
            token = int(choose_token(logits[row, lasts.index(len(request.prompt) - 1)].float(), request))
            request.first_token_at = time.perf_counter()
            self._append(request, token)

    def _step(self):
        top = max(self.active) + 1
        if top > 1 and self.one_row_autotune and not self._one_row_used and self.min_rows == 1:
            # a batch workload (eval, batch infer, a loaded server) before any batch-1 decoding: its
            # single-row tail steps take the dynamic step, not a first one-row compilation (~25 s of
            # autotuning on the H200) near the end of the run
            self.min_rows = 2
        rows = min(_next_pow2(max(top, self.min_rows)), max(self.cache.slots, 1))
        rows = max(rows, top)
        self._one_row_used |= rows == 1
        tokens, positions = [0] * rows, [0] * rows
        for slot, request in self.active.items():
            tokens[slot], positions[slot] = request.generated[-1], request.position
        kv_len = self._kv_bucket(max(positions) + 1)
        ids = torch.tensor(tokens, device=self.device)[:, None]
        pos = torch.tensor(positions, device=self.device)[:, None]
        requests = list(self.active.items())
        if all(r.argmax_only for _, r in requests):
            run = self._greedy_run_length(requests, kv_len - max(positions))
            return self._greedy_run(requests, ids, pos, kv_len, run)
        logits = self._run_decode(ids, pos, self._kv_index(kv_len)).float()
        plain = [s for s, r in requests if r.argmax_only]
        chosen = {}
        if plain:
            picks = logits[plain].argmax(-1).tolist()
            chosen.update(zip(plain, picks))
        for slot, request in requests:
            if slot not in chosen:
                chosen[slot] = int(choose_token(logits[slot], request))
        self.stats["decode_steps"] += 1
        self.stats["decode_reads"] += 1
        self.stats["decode_tokens"] += len(requests)
        for slot, request in requests:
            request.position += 1
            self._append(request, chosen[slot])

    def _greedy_run_length(self, requests, keys_left: int) -> int:
        """How many argmax-only decode steps to run back to back: up to `greedy_run`, or up to
        `greedy_run_waiting` while requests wait for a slot (a row that stops on a stop token inside the run
        keeps its slot to the run's end: a waiting request starts at most that many steps later); never past
        a request's last token (a slot freed by length is refilled right after the run), `max_len`, or the
        key bucket (`keys_left` positions before the longest row needs more keys: another compiled shape).
        Each run ends in one host read instead of one per step: the H200 profile of a batched run with one
        read per step while requests waited had its GPU idle 36% of the wall time (benchmarks/RESULTS.md)."""
        limit = min(self.greedy_run, self.greedy_run_waiting) if self.pending else self.greedy_run
        if limit < 2:
            return 1
        left = [r.max_new_tokens - len(r.generated) for _, r in requests]
        if self.max_len:
            left += [self.max_len - r.position for _, r in requests]
        return max(1, min(limit, keys_left, *left))

    def _greedy_run(self, requests, ids, pos, kv_len: int, n: int):
        """n argmax-only decode steps, each fed the previous step's argmax on the device, with one host read of
        all n tokens at the end: the GPU never waits for the host between steps (per step the host only
        queues work: two copies and a graph replay). The same computations as n single steps, so the same
        tokens; a request that stops inside the run has its later tokens dropped (they only wrote keys past
        its end, which nothing attends to)."""
        kv_index = self._kv_index(kv_len)
        if n > 1:  # rows without a request stay at position 0
            live = torch.tensor([int(s in self.active) for s in range(ids.shape[0])], device=self.device)[:, None]
        picks = []
        for step in range(n):
            picks.append(self._run_decode(ids, pos, kv_index).float().argmax(-1))
            if step + 1 < n:
                ids, pos = picks[-1][:, None], pos + live
        chosen = torch.stack(picks).tolist()  # the run's one wait for the device
        self.stats["decode_steps"] += n
        self.stats["decode_reads"] += 1
        for tokens in chosen:
            for slot, request in requests:
                if self.active.get(slot) is request:  # not finished earlier in this run
                    self.stats["decode_tokens"] += 1
                    request.position += 1
                    self._append(request, tokens[slot])

    def _append(self, request: Request, token: int):
        request.generated.append(token)
        if request.stream:
            request.tokens.put([token])
        if token in self.stop_ids:
            self._finish(request, reason="stop")
        elif len(request.generated) >= request.max_new_tokens:
            self._finish(request, reason="length")
        elif self.max_len and request.position >= self.max_len:
            self._finish(request, reason="length")

    stop_ids: frozenset = frozenset()

    def _finish(self, request: Request, reason: str | None = None, error: BaseException | None = None):
        if request.slot is not None and self.active.get(request.slot) is request:
            del self.active[request.slot]
        request.finish_reason, request.error = reason, error
        request.finished_at = time.perf_counter()
        if request.stream:
            request.tokens.put(error if error is not None else END)
        request.done.set()
        if request.on_done is not None:
            try:
                request.on_done(request)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the loop
                logger.exception("generation callback failed")

    # -- the forward ----------------------------------------------------------------------------
    def _kv_index(self, kv_len: int) -> torch.Tensor:
        cached = getattr(self, "_kv_cache", None)
        if cached is None or cached.shape[0] < self.cache.length:
            cached = self._kv_cache = torch.arange(max(self.cache.length, kv_len), device=self.device)
        return cached[:kv_len]

    def _kv_bucket(self, n: int) -> int:
        """Keys attended for a query at position n - 1: a power of two times `granularity`, so that few
        shapes exist (attending masked extra keys costs little next to reading the weights)."""
        return min(self.granularity * _next_pow2(-(-n // self.granularity)), self.cache.length)

    def _masks(self, positions: torch.Tensor, kv_index: torch.Tensor):
        """{layer type: additive mask [rows, 1, q, kv]}: 0 where a row may attend, finfo.min elsewhere."""
        q = positions[:, None, :, None]
        k = kv_index[None, None, None, :]
        allowed = k <= q
        low = torch.finfo(self.dtype).min
        masks = {}
        for kind in self.layer_types:
            ok = allowed
            if kind == "sliding_attention" and self.sliding_window:
                ok = ok & (k > q - self.sliding_window)
            elif kind not in ("full_attention", "sliding_attention"):
                raise NotImplementedError(f"layer type {kind}")
            masks[kind] = torch.where(ok, torch.zeros((), dtype=self.dtype, device=ok.device),
                                      torch.full((), low, dtype=self.dtype, device=ok.device))
        if not getattr(self.config, "layer_types", None):
            return masks["full_attention"]
        return masks

    def _forward(self, ids, positions, kv_len, slots: torch.Tensor, keep: torch.Tensor):
        """Prefill: logits [rows, len(keep), vocab] at the sequence indices `keep`."""
        kv_index = self._kv_index(kv_len)
        layers = self._compiled_prefill_layers()
        if layers is not None:
            first = not self._prefill_compiled_once
            start = time.perf_counter()
            try:
                with _compiled_layers(layers[0], layers[1], kv_index), \
                        still_running("compiling the prefill") if first else contextlib.nullcontext():
                    logits = self._forward_eager(ids, positions, kv_len, slots, keep, kv_index)
                self._prefill_compiled_once = True
                if first:
                    logger.info(f"prefill compiled and run in {time.perf_counter() - start:.1f}s")
                return logits
            except torch._dynamo.exc.TorchDynamoException as e:  # compilation failed: fall back, same tokens
                logger.warning(f"compiling the prefill failed ({type(e).__name__}: {str(e)[:300]}); "
                               "prefilling without compilation from now on")
                self.compile_prefill = False
        return self._forward_eager(ids, positions, kv_len, slots, keep, kv_index)

    def _forward_eager(self, ids, positions, kv_len, slots, keep, kv_index):
        view = CacheView(self.cache, positions, kv_len, slots)
        with grouped_attention(self.config):
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=self._masks(positions, kv_index),
                             use_cache=True, logits_to_keep=keep, **{self._cache_kwarg: view})
        return out.logits

    def _compiled_prefill_layers(self):
        """(decoder layers, their compiled runner) for the prefill, or None: eager (compile_prefill off, no
        compilation, or decoder layers not found)."""
        if not self.compile_prefill or self.compile_mode is None:
            return None
        layers = decoder_layers(self.model)
        if layers is None or len(layers) != self.config.num_hidden_layers:
            return None
        if self._prefill_layer is None:
            self._inductor_setup()
            logger.info("compiling the prefill's decoder layers (torch.compile, dynamic shapes) on first use; "
                        "one-time, may take a minute")
            torch.fx.experimental._config.use_duck_shape = False
            self._prefill_layer = torch.compile(_run_layer_prefill, dynamic=True, backend=self._backend())
        return layers, self._prefill_layer

    def _forward_decode(self, ids, positions, kv_index):
        view = CacheView(self.cache, positions, kv_index.shape[0])
        with grouped_attention(self.config):
            out = self.model(input_ids=ids, position_ids=positions, attention_mask=self._masks(positions, kv_index),
                             use_cache=True, logits_to_keep=1, **{self._cache_kwarg: view})
        return out.logits[:, -1]

    def _run_decode(self, ids, pos, kv_index):
        if self.compile_mode is not None and self._compiled is None:
            logger.info(f"compiling the decode step ({self._compile_label()}) on first use; one-time, "
                        "may take a minute")
            try:
                self._decode = self._compile()
            except Exception as e:  # noqa: BLE001
                logger.warning(f"torch.compile unavailable ({type(e).__name__}: {e}); decoding without it")
                self.compile_mode = None
        if self._decode is self._forward_decode:
            return self._forward_decode(ids, pos, kv_index)
        start = time.perf_counter()
        try:
            out = self._decode(ids, pos, kv_index)
        except Exception as e:  # noqa: BLE001 - compiled decoding is an optimisation: fall back, same tokens
            logger.warning(f"the compiled decode step failed ({type(e).__name__}: {str(e)[:300]}); "
                           "decoding without compilation from now on")
            self._decode = self._forward_decode
            return self._forward_decode(ids, pos, kv_index)
        seconds = time.perf_counter() - start
        if seconds > 5 and self._graphs is None:
            logger.info(f"decode step compiled for {ids.shape[0]} row(s) x {kv_index.shape[0]} keys "
                        f"in {seconds:.1f}s")
        return out

    def _compile_label(self) -> str:
        if self.compile_mode == "graphs":
            return "torch.compile, dynamic shapes, replayed as CUDA graphs per rows x keys bucket"
        return f"torch.compile mode={self.compile_mode}"

    def _warm_up_prefill(self) -> float:
        """A prefill of one row and one of two rows (the shapes torch.compile tells apart) into idle slots
        (their keys are overwritten by the next prompts there), so that the first requests do not compile it."""
        if self.active or self._prefill_compiled_once or self._compiled_prefill_layers() is None:
            return 0.0
        start = time.perf_counter()
        self._grow_cache(max(self.cache.slots, 2), _round_up(max(self.cache.length, self.granularity), self.granularity))
        width = self.granularity
        for n in (1, 2):
            ids = torch.zeros((n, width), dtype=torch.long, device=self.device)
            positions = torch.arange(width, device=self.device)[None].expand(n, width)
            self._forward(ids, positions, self._kv_bucket(width), torch.arange(n, device=self.device),
                          torch.tensor([width - 1], device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        logger.info(f"prefill compiled in {seconds:.1f}s" if self.compile_prefill else
                    "prefill: compilation failed, eager")
        return seconds

    def _warm_up(self, rows=(1,), slots: int | None = None, length: int | None = None, all_lengths: bool = False):
        """Size the cache (slots x length) and, when compiling, build the decode step and run it once
        per rows bucket (and key bucket) on idle slots, logged. Seconds spent."""
        start = time.perf_counter()
        self._grow_cache(max(slots or 0, self.cache.slots, 1),
                         _round_up(max(length or 0, self.cache.length, self.granularity), self.granularity))
        if self.compile_mode is None or self.active:
            return 0.0
        if self._compiled is not None and not (self._graphs is not None and all_lengths):
            return 0.0
        logger.info(f"compiling the decode step ({self._compile_label()}; one-time warm-up, may take a minute)")
        try:
            if self._compiled is None:
                self._decode = self._compile()
            row_buckets = sorted({min(max(n, self.min_rows), self.cache.slots) for n in {1, 2, *rows}})
            kv_lens = sorted({self._kv_bucket(n) for n in range(1, self.cache.length + 1, self.granularity)}) \
                if all_lengths else sorted({self._kv_bucket(1), self._kv_bucket(self.granularity + 1)})
            for n in row_buckets:
                for kv_len in kv_lens:
                    ids = torch.zeros((n, 1), dtype=torch.long, device=self.device)
                    pos = torch.zeros((n, 1), dtype=torch.long, device=self.device)
                    for _ in range(1 if self._graphs is not None else 3):  # graph trees record on a later call
                        self._decode(ids, pos, self._kv_index(kv_len))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - compiled decoding is an optimisation
            logger.warning(f"compiling the decode step failed ({type(e).__name__}: {str(e)[:300]}); "
                           "decoding without compilation")
            self._decode = self._forward_decode
            self._graphs = None
        seconds = time.perf_counter() - start
        logger.info(f"decode step ready in {seconds:.1f}s")
        return seconds

    def _inductor_setup(self) -> None:
        if self.device.type == "cuda":
            import torch._inductor.config as inductor_config
            inductor_config.emulate_precision_casts = True  # round like eager bf16: same greedy tokens

    @staticmethod
    def _backend() -> str:
        return os.environ.get("ZHTUNE_PT_COMPILE_BACKEND", "inductor")

    def _compile(self):
        self._inductor_setup()
        backend = self._backend()
        if self.compile_mode == "graphs":
            self._compiled = self.compile_step(backend)
            self._graphs = GraphedDecode(self._compiled, self.device)
            return self._graphs
        kwargs = {"backend": backend, "dynamic": None, "fullgraph": False}
        if backend == "inductor":
            kwargs["mode"] = None if self.compile_mode == "default" else self.compile_mode
        self._compiled = torch.compile(self._forward_decode, **kwargs)
        return self._checked(self._compiled)

    def compile_step(self, backend: str = "inductor", per_layer: bool = True):
        """The decode step with its decoder layers compiled, once for every layer of a kind, every rows x
        keys shape and cache size: a callable (ids, positions, kv_index) -> logits like `_forward_decode`.

        Per layer rather than the whole step: the first compilation of a whole-model step grows with the
        layer count or faster (benchmarks/RESULTS.md has the measurements), while one layer's graph serves
        all of them, since dynamo inlines nn modules (the weights are graph inputs) and each layer gets a
        `LayerCache` of its own buffers (its layer index is never read). The embedding, masks, final norm,
        lm_head and softcap stay eager; under CUDA graphs they are recorded with the rest. `per_layer=False` (or a model whose decoder
        layers are not found) compiles the whole step as one graph.

        Dynamic sizes, no guards from sizes that merely happen to be equal (rows == key/value heads, say),
        and a cache buffer one position longer than ever attended (SlotCache) so no slice is ever
        contiguous."""
        torch.fx.experimental._config.use_duck_shape = False
        layers = decoder_layers(self.model) if per_layer else None
        if layers is None or len(layers) != self.config.num_hidden_layers:
            return torch.compile(self._forward_decode, dynamic=True, backend=backend)
        run_layer = torch.compile(_run_layer, dynamic=True, backend=backend)
        run_one_row = run_layer
        if self.one_row_autotune and backend == "inductor":
            # its own function (own code object, own dynamo cache): one row is a static size in its graph,
            # the keys stay dynamic; the options apply to this compilation only
            run_one_row = torch.compile(_run_layer_one_row, dynamic=True, backend=backend, options=ONE_ROW_OPTIONS)

        def step(ids, positions, kv_index):
            with _compiled_layers(layers, run_one_row if ids.shape[0] == 1 else run_layer, kv_index):
                return self._forward_decode(ids, positions, kv_index)
        return step

    @staticmethod
    def _mark_dynamic(ids, pos, kv_index):
        torch._dynamo.maybe_mark_dynamic(ids, 0)
        torch._dynamo.maybe_mark_dynamic(pos, 0)
        torch._dynamo.maybe_mark_dynamic(kv_index, 0)

    def _checked(self, compiled):
        graphs = bool(self.compile_mode) and "reduce-overhead" in self.compile_mode and self.device.type == "cuda"
        first = [True]  # the first call compiles: it says it is alive while it does (GraphedDecode's own too)

        def decode(ids, pos, kv_index):
            self._mark_dynamic(ids, pos, kv_index)
            if graphs:  # each call is a new step: the previous call's output buffers may be reused
                torch.compiler.cudagraph_mark_step_begin()
            with still_running("compiling the decode step") if first[0] else contextlib.nullcontext():
                out = compiled(ids, pos, kv_index)
            first[0] = False
            return out.clone() if graphs else out
        return decode


def _run_layer(forward, *args, **kwargs):
    """Compiled once per kind of decoder layer: `forward` is a layer's own (bound) forward, its weights are
    graph inputs (dynamo inlines nn modules), its cache a `LayerCache`."""
    return forward(*args, **kwargs)


def _run_layer_prefill(forward, *args, **kwargs):
    """`_run_layer` for the prefill (its own code object: its own dynamo cache and recompilation limit)."""
    return forward(*args, **kwargs)


def _run_layer_one_row(forward, *args, **kwargs):
    """`_run_layer` for a single row (batch-1 decoding), compiled with ONE_ROW_OPTIONS."""
    return forward(*args, **kwargs)


# inductor options of the one-row decode step: each projection of one row is a matrix-vector product,
# bound by reading the weights; coordinate descent tunes the block sizes of the kernels inductor generates
# for them (cuBLAS's reach ~55% of the bandwidth). On the H200 (benchmarks/RESULTS.md, seventh session):
# 166.3 tokens/s with this alone, 157.6 with max_autotune added, 144.8 with max_autotune_gemm added, 133.9
# with max_autotune_gemm alone (GEMM templates instead of tuned reductions).
ONE_ROW_OPTIONS = {"coordinate_descent_tuning": True}


@contextlib.contextmanager
def _compiled_layers(layers, run_layer, kv_index):
    """Within the block, each decoder layer runs through `run_layer` with its own `LayerCache`."""
    saved = []
    for i, layer in enumerate(layers):
        own = layer.__dict__.get("forward")  # an instance forward (accelerate's hooks) stays in the call

        def forward(*args, _i=i, _forward=layer.forward, **kwargs):
            args = [a.layer(_i, kv_index) if isinstance(a, CacheView) else a for a in args]
            kwargs = {k: v.layer(_i, kv_index) if isinstance(v, CacheView) else v for k, v in kwargs.items()}
            return run_layer(_forward, *args, **kwargs)
        saved.append(own)
        layer.forward = forward
    try:
        yield
    finally:
        for layer, own in zip(layers, saved):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def _close_at_exit(ref) -> None:
    scheduler = ref()
    if scheduler is not None:
        scheduler.close(timeout=10.0)


def cache_kwarg(model) -> str:
    """transformers 5.x renamed forward's past_key_values to cache (the old name is deprecated)."""
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
