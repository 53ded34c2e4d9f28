"""The `vllm` backend: vllm's offline engine behind the Engine interface.

`complete` hands a whole batch to `LLM.generate` (vllm schedules it itself); `stream_ids` adds one
request to the engine and steps it, yielding each delta as vllm produces it. Sampling follows
ms-swift v2's defaults through the same GenerationSettings as the pt backend; a reply stops at the
template's end-of-turn tokens. LoRA checkpoints reach vllm merged (`--merge_lora true`).
"""

import itertools
from typing import Iterator

from zhtune.errors import UserError
from zhtune.infer.base import Completion, Delta, Engine, GenerationSettings

_request_ids = itertools.count()


class VllmEngine(Engine):
    schedules_itself = True

    def __init__(self, llm, tokenizer, template, **kwargs):
        if kwargs.get("max_model_len") is None:
            kwargs["max_model_len"] = llm.llm_engine.model_config.max_model_len
        super().__init__(tokenizer, template, **kwargs)
        self.llm = llm

    def sampling_params(self, settings: GenerationSettings, delta: bool = False):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind
        if settings.num_beams > 1:
            raise UserError("--num_beams > 1 is not supported with --infer_backend vllm; use --infer_backend pt.")
        common = dict(max_tokens=settings.max_new_tokens, stop_token_ids=list(self.stop_ids),
                      repetition_penalty=settings.repetition_penalty, seed=settings.seed, skip_special_tokens=True,
                      output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)
        if settings.greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, **common)

    def complete(self, prompts, settings, batch_size=8, progress=False):
        from vllm.inputs import TokensPrompt
        with self.lock:
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                        self.sampling_params(settings), use_tqdm=progress)
        return [Completion(o.outputs[0].text.strip(), len(o.prompt_token_ids), len(o.outputs[0].token_ids),
                           _finish_reason(o.outputs[0])) for o in outputs]

    def stream_ids(self, prompt, settings) -> Iterator[Delta]:
        engine = self.llm.llm_engine
        request_id = f"zhtune-{next(_request_ids)}"
        params = self.sampling_params(settings, delta=True)
        produced = 0
        with self.lock:
            engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, params)
            try:
                first = True
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.request_id != request_id:
                            continue
                        piece = out.outputs[0]
                        produced += len(piece.token_ids)
                        text = piece.text.lstrip() if first else piece.text
                        first = first and not text
                        if out.finished:
                            yield Delta(text.rstrip(), _finish_reason(piece), len(prompt), produced)
                            return
                        if text:
                            yield Delta(text)
            finally:
                if engine.has_unfinished_requests():
                    engine.abort_request([request_id])


def _finish_reason(output) -> str:
    return "length" if output.finish_reason == "length" else "stop"
