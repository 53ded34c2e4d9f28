"""The `pt` backend: transformers' `generate`, batched with left padding, streamed through a thread.

Generation runs under the engine's lock (one generate call at a time on one model). A failure inside
the generating thread is handed to the reader and raised there: the lock is released and the next
request is served. A reader that stops early (a client that went away) stops the generation at the
next token.
"""

import queue
import threading
from typing import Iterator

from zhtune.infer.base import Completion, Delta, Engine, GenerationSettings

_END = object()


class PtEngine(Engine):
    def __init__(self, model, tokenizer, template, **kwargs):
        if kwargs.get("max_model_len") is None:
            config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            kwargs["max_model_len"] = getattr(config, "max_position_embeddings", None)
        super().__init__(tokenizer, template, **kwargs)
        self.model = model

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

    def complete(self, prompts, settings, batch_size=8, progress=False):
        import torch
        from tqdm import tqdm

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        results: list[Completion | None] = [None] * len(prompts)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with self.lock:
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

    def stream_ids(self, prompt, settings) -> Iterator[Delta]:
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
        """Decode token by token; text is released only once it decodes to whole characters."""
        generated: list[int] = []
        sent = ""
        while True:
            item = tokens.get()
            if isinstance(item, BaseException):
                raise item
            if item is not _END:
                generated += item
                if not any(t in self.stop_ids for t in generated):
                    text = self.tokenizer.decode(generated, skip_special_tokens=True)
                    if text.startswith(sent) and not text.endswith("\ufffd") and len(text) > len(sent):
                        yield Delta(text[len(sent):])
                        sent = text
                    continue
            text, n, reason = self.decode_reply(generated)
            rest = text[len(sent.strip()):] if text.startswith(sent.strip()) else ""
            yield Delta(rest, reason, prompt_tokens, n)
            return
