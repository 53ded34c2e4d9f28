"""vllm's offline API behind the Engine interface. LoRA checkpoints reach it as merged folders."""

from zhtune.infer.engine import Engine, GenerationSettings, ModelSpec
from zhtune.models.loader import ResolvedModel, load_tokenizer, model_dir
from zhtune.templates import get_template


class VllmEngine(Engine):
    def __init__(self, resolved: ResolvedModel, spec: ModelSpec, log=print):
        from vllm import LLM

        path = model_dir(resolved, spec.model_revision)
        log(f"[zhtune] loading {resolved.model_type} from {path} with vllm")
        dtype = {"AUTO": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[spec.dtype]
        self.llm = LLM(model=str(path), dtype=dtype, seed=0)
        self.tokenizer = load_tokenizer(path)
        self.model_type = resolved.model_type
        self.model_dir = path
        self.template = get_template(resolved.template, self.tokenizer)

    def _params(self, settings: GenerationSettings):
        from vllm import SamplingParams
        common = dict(max_tokens=settings.max_new_tokens, stop_token_ids=self.template.stop_token_ids(),
                      repetition_penalty=settings.repetition_penalty, seed=settings.seed)
        if settings.greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p, **common)

    def generate(self, conversations, settings, batch_size=8, progress=False):
        from vllm.inputs import TokensPrompt
        prompts = [TokensPrompt(prompt_token_ids=self.template.encode(self.with_system(m), True).input_ids)
                   for m in conversations]
        outputs = self.llm.generate(prompts, self._params(settings), use_tqdm=progress)
        return [o.outputs[0].text.strip() for o in outputs]
