"""The `pt` backend: transformers models, generating through a continuous-batching scheduler.

Every request (`complete`'s prompts, `stream_ids` from any number of threads) goes to one scheduler
(zhtune/infer/batching.py) that steps all active requests together over a static slotted KV cache,
with a compiled decode step on CUDA. Greedy tokens are those of transformers' `generate`; each request
keeps its own settings (max_new_tokens, sampling, seed, repetition penalty). A stream whose reader
stops early frees its slot at the next step; a failing request raises in its own caller.

What the scheduler does not do goes to plain `generate` (run on the scheduler thread, so the model is
never used by two threads at once): beam search, and models whose attention cannot take the
scheduler's masks (flash / flex attention, layer types other than full and sliding). With
`batching=False` the engine is the plain `generate` path throughout (one call at a time, under a lock).
"""

import queue
import threading
import time
from typing import Iterator

from zhtune.infer.base import Completion, Delta, Engine, GenerationSettings
from zhtune.infer.batching import END as _END
from zhtune.infer.batching import Request, Scheduler
from zhtune.log import logger

SCHEDULER_ATTENTION = ("eager", "sdpa")


def scheduler_unsupported(model) -> str | None:
    """Why the batching scheduler cannot run this model (None: it can)."""
    if model.training:  # dropout, and gradient checkpointing drops the cache argument
        return "the model is in training mode"
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    attn = getattr(config, "_attn_implementation", None) or "eager"
    if attn not in SCHEDULER_ATTENTION:
        return f"attention {attn}"
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(kinds)}"
    if getattr(config, "is_encoder_decoder", False) or not hasattr(config, "num_key_value_heads"):
        return "not a decoder-only model with a key/value cache"
    return None


class PtEngine(Engine):
    """`max_batch_size`: the scheduler's slots (requests decoded together; default 32 on CUDA, 16 on the
    CPU; a `complete` call with a larger batch_size raises it). `compile`: None (default: on CUDA),
    False, or a torch.compile mode. `fuse_weights`: the scheduler may fuse the model's projections for
    its CUDA-graph decode step (Scheduler's argument; for an engine that owns its model)."""

    def __init__(self, model, tokenizer, template, *, batching: bool = True, max_batch_size: int | None = None,
                 compile=None, fuse_weights: bool = False, **kwargs):
        if kwargs.get("max_model_len") is None:
            config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            kwargs["max_model_len"] = getattr(config, "max_position_embeddings", None)
        super().__init__(tokenizer, template, **kwargs)
        self.model = model
        why = scheduler_unsupported(model) if batching else "batching=False"
        if batching and why:
            logger.info(f"pt backend: generating with transformers' generate ({why}; no continuous batching)")
        self.batching = why is None
        self.max_batch_size, self.compile, self.fuse_weights = max_batch_size, compile, fuse_weights
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()

    @property
    def scheduler(self) -> Scheduler:
        with self._scheduler_lock:
            if self._scheduler is None:
                on_gpu = self.device.type == "cuda"
                self._scheduler = Scheduler(self.model, max_slots=self.max_batch_size or (32 if on_gpu else 16),
                                            max_len=self.max_model_len, compile=self.compile,
                                            fuse_weights=self.fuse_weights)
                self._scheduler.stop_ids = frozenset(self.stop_ids)
            return self._scheduler

    def warm_up(self, rows=(1,), slots: int | None = None, length: int | None = None) -> float:
        """Size the cache and compile the decode step now instead of on first use (logged)."""
        return self.scheduler.warm_up(rows, slots, length) if self.batching else 0.0

    def _uses_scheduler(self, settings: GenerationSettings) -> bool:
        return self.batching and settings.num_beams <= 1

    def _request(self, prompt: list[int], settings: GenerationSettings, seed: int | None, **kwargs) -> Request:
        greedy = settings.greedy
        return Request(list(prompt), settings.max_new_tokens, greedy=greedy,
                       temperature=1.0 if greedy else settings.temperature, top_k=settings.top_k or 0,
                       top_p=1.0 if settings.top_p is None else settings.top_p,
                       repetition_penalty=settings.repetition_penalty or 1.0, seed=seed, **kwargs)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate_kwargs(self, settings: GenerationSettings) -> dict:
        kwargs = {"max_new_tokens": settings.max_new_tokens, "eos_token_id": self.stop_ids,
                  "pad_token_id": self.tokenizer.pad_token_id, "repetition_penalty": settings.repetition_penalty,
                  "num_beams": settings.num_beams}
        if settings.greedy:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        return kwargs

    # -- through the scheduler ------------------------------------------------------------------
    def complete(self, prompts, settings, batch_size=8, progress=False):
        if not self._uses_scheduler(settings):
            if self.batching:  # beam search: plain generate, on the scheduler thread
                return self.scheduler.run_exclusive(lambda: self._hf_complete(prompts, settings, batch_size, progress))
            with self.lock:
                return self._hf_complete(prompts, settings, batch_size, progress)
        from tqdm import tqdm

        scheduler = self.scheduler
        scheduler.ensure_slots(batch_size)
        finished: queue.Queue = queue.Queue()
        requests = [self._request(p, settings, None if settings.seed is None else settings.seed + i,
                                  on_done=finished.put) for i, p in enumerate(prompts)]
        start = time.perf_counter()
        bar = tqdm(total=len(requests), desc="generate", unit="item", disable=not progress)
        try:
            for request in requests:
                scheduler.submit(request)
            left, shown = len(requests), start
            while left:
                try:  # the bar's tokens/s moves every second, also while no reply has finished yet
                    request = finished.get(timeout=1.0)
                except queue.Empty:
                    request = None
                if request is not None:
                    if request.error is not None:
                        raise request.error
                    left -= 1
                    bar.update(1)
                now = time.perf_counter()
                if progress and (now - shown >= 1.0 or not left):
                    made, shown = sum(len(r.generated) for r in requests), now
                    bar.set_postfix_str(f"{made / max(now - start, 1e-9):.1f} tokens/s")
        finally:
            bar.close()
            for request in requests:  # an error or an interrupt: the rest stop at the next step
                request.cancel()
        results = []
        for prompt, request in zip(prompts, requests):
            text, n, reason = self.decode_reply(request.generated)
            results.append(Completion(text, len(prompt), n, reason))
        return results

    def stream_ids(self, prompt, settings) -> Iterator[Delta]:
        if not self._uses_scheduler(settings):
            yield from self._hf_stream(prompt, settings)
            return
        request = self.scheduler.submit(self._request(prompt, settings, settings.seed, stream=True))
        try:
            yield from self._deltas(request.tokens, len(prompt))
        finally:
            request.cancel()  # a reader that left early frees the slot at the next step

    # -- plain generate -------------------------------------------------------------------------
    def _hf_complete(self, prompts, settings, batch_size=8, progress=False):
        import torch
        from tqdm import tqdm

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        results: list[Completion | None] = [None] * len(prompts)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        for batch in tqdm(batches, desc="generate", disable=not progress):
            width = max(len(prompts[i]) for i in batch)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in batch],
                                device=self.device)
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, **self.generate_kwargs(settings))
            for row, i in zip(out[:, width:].tolist(), batch):
                text, n, reason = self.decode_reply(row)
                results[i] = Completion(text, len(prompts[i]), n, reason)
        return results

    def _hf_stream(self, prompt, settings) -> Iterator[Delta]:
        if settings.num_beams > 1:  # transformers streams no beam search: answer in one piece
            yield from super().stream_ids(prompt, settings)
            return
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokens: queue.Queue = queue.Queue()
        cancelled = threading.Event()

        class Feed(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate's first call hands over the prompt
                    self.first = False
                    return
                tokens.put(value.reshape(-1).tolist())

            def end(self):
                pass

        class StopWhenCancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        def run():
            try:
                with self.lock, torch.no_grad():
                    if settings.seed is not None:
                        torch.manual_seed(settings.seed)
                    ids = torch.tensor([prompt], device=self.device)
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=Feed(),
                                        stopping_criteria=StoppingCriteriaList([StopWhenCancelled()]),
                                        **self.generate_kwargs(settings))
                tokens.put(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the reader, raised there
                tokens.put(e)

        thread = threading.Thread(target=run, daemon=True, name="zhtune-generate")
        thread.start()
        try:
            yield from self._deltas(tokens, len(prompt))
        finally:
            cancelled.set()  # a reader that left early stops the generation at its next token
            thread.join()

    def _deltas(self, tokens: queue.Queue, prompt_tokens: int) -> Iterator[Delta]:
        """Decode token by token; text is released only once it decodes to whole characters. Only the
        tokens since the last release are decoded (with the one before as context), so a long reply costs
        linear, not quadratic, decoding."""
        generated: list[int] = []
        sent = ""
        prefix, read = 0, 0  # generated[prefix:read] decodes to the tail of `sent`
        while True:
            item = tokens.get()
            if isinstance(item, BaseException):
                raise item
            if item is not _END:
                generated += item
                if not any(t in self.stop_ids for t in item):
                    before = self.tokenizer.decode(generated[prefix:read], skip_special_tokens=True)
                    text = self.tokenizer.decode(generated[prefix:], skip_special_tokens=True)
                    if text.startswith(before) and not text.endswith("\ufffd") and len(text) > len(before):
                        yield Delta(text[len(before):])
                        sent += text[len(before):]
                        prefix, read = read, len(generated)
                    continue
            text, n, reason = self.decode_reply(generated)
            rest = text[len(sent.strip()):] if text.startswith(sent.strip()) else ""
            yield Delta(rest, reason, prompt_tokens, n)
            return
