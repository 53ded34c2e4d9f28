"""What every generation backend offers (`Engine`), what it is asked (`GenerationSettings`) and what
it answers (`Completion`, `Delta`). Backends: pt_engine.py (transformers), vllm_engine.py."""

import threading
from dataclasses import dataclass, fields
from typing import Iterator

from zhtune.args import GenerationArguments


@dataclass
class GenerationSettings(GenerationArguments):
    """The generation flags (declared once, in GenerationArguments) plus the run's seed."""
    seed: int | None = None

    @classmethod
    def from_args(cls, args, **override) -> "GenerationSettings":
        values = {f.name: getattr(args, f.name) for f in fields(cls)
                  if getattr(args, f.name, None) is not None}
        values.update(override)
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)


@dataclass
class Delta:
    """A piece of a streamed reply; the last one has finish_reason set and the token counts."""
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Engine:
    """A loaded model with its tokenizer and chat template, ready to generate.

    Backends implement `complete` (a batch of prompts) and `stream_ids` (one prompt, piece by piece).
    Both may be called from several threads: a backend serialises or batches them itself, and a
    failure inside generation raises in the caller and leaves the engine usable."""

    name: str = ""
    model_type: str = ""
    schedules_itself = False  # True: give it whole datasets at once (vllm); False: the caller chunks them

    def __init__(self, tokenizer, template, *, name: str, model_type: str, system: str | None = None,
                 max_model_len: int | None = None):
        self.tokenizer, self.template = tokenizer, template
        self.name, self.model_type, self.system = name, model_type, system
        self.max_model_len = max_model_len
        self.stop_ids = template.stop_token_ids()
        self.lock = threading.Lock()

    # -- what backends implement ----------------------------------------------------------------
    def complete(self, prompts: list[list[int]], settings: GenerationSettings, batch_size: int = 8,
                 progress: bool = False) -> list[Completion]:
        raise NotImplementedError

    def stream_ids(self, prompt: list[int], settings: GenerationSettings) -> Iterator[Delta]:
        completion = self.complete([prompt], settings, batch_size=1)[0]
        yield Delta(completion.text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens)

    # -- conversations --------------------------------------------------------------------------
    def with_system(self, messages: list[dict]) -> list[dict]:
        if self.system and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}] + messages
        return messages

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        return self.template.encode(self.with_system(messages), add_generation_prompt=True).input_ids

    def render_prompt(self, messages: list[dict]) -> str:
        """The exact text the model sees (system prompt and chat markers included)."""
        return self.template.render(self.with_system(messages), add_generation_prompt=True)

    def generate(self, conversations: list[list[dict]], settings: GenerationSettings, batch_size: int = 8,
                 progress: bool = False) -> list[str]:
        return [c.text for c in self.generate_completions(conversations, settings, batch_size, progress)]

    def generate_completions(self, conversations: list[list[dict]], settings: GenerationSettings,
                             batch_size: int = 8, progress: bool = False) -> list[Completion]:
        """Replies with their token counts and finish reasons (eval reports output tokens/s from them)."""
        prompts = [self.encode_prompt(m) for m in conversations]
        return self.complete(prompts, settings, batch_size=batch_size, progress=progress)

    def stream(self, messages: list[dict], settings: GenerationSettings) -> Iterator[str]:
        for delta in self.stream_ids(self.encode_prompt(messages), settings):
            if delta.text:
                yield delta.text

    def decode_reply(self, ids: list[int]) -> tuple[str, int, str]:
        """(text, tokens generated, finish_reason) of generated ids, cut at the first stop token."""
        cut = next((k for k, t in enumerate(ids) if t in self.stop_ids), None)
        reason = "stop" if cut is not None else "length"
        kept = ids if cut is None else ids[:cut]
        return self.tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept) + (cut is not None), reason
