"""Model classes zhtune adds to vllm's registry.

vllm's Gemma2ForCausalLM asserts `tie_word_embeddings` and computes logits with the input embedding.
The seed's LoRA adapts both the embedding and lm_head; merging gives each its own weights, so a merged
seed checkpoint is untied (zhtune/tuners/merge.py). `UntiedGemma2ForCausalLM` is vllm's Gemma 2 with
an lm_head of its own when the config says untied, and exactly vllm's class when tied (Gemma 3 in vllm
already handles both). `register()` puts it in place of vllm's; it runs in zhtune's process before the
engine starts (the engine core inherits it) and as a vllm plugin (pyproject entry point
`vllm.general_plugins`) in every process vllm starts.
"""


def register() -> None:
    from vllm import ModelRegistry
    ModelRegistry.register_model("Gemma2ForCausalLM", "zhtune.infer.vllm_models:UntiedGemma2ForCausalLM")


def __getattr__(name):  # the class is built on first use: importing vllm is slow and needs a GPU build
    if name == "UntiedGemma2ForCausalLM":
        return _untied_gemma2()
    raise AttributeError(name)


def _untied_gemma2():
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.model_executor.models.gemma2 import Gemma2ForCausalLM
    from vllm.model_executor.models.utils import maybe_prefix

    class UntiedGemma2ForCausalLM(Gemma2ForCausalLM):
        def __init__(self, *, vllm_config, prefix: str = ""):
            config = vllm_config.model_config.hf_config
            tied = config.tie_word_embeddings
            config.tie_word_embeddings = True  # vllm's __init__ asserts it; restored right after
            try:
                super().__init__(vllm_config=vllm_config, prefix=prefix)
            finally:
                config.tie_word_embeddings = tied
            if not tied:
                self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=self.quant_config,
                                              prefix=maybe_prefix(prefix, "lm_head"))

        def compute_logits(self, hidden_states):
            head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
            return self.logits_processor(head, hidden_states)

    globals()["UntiedGemma2ForCausalLM"] = UntiedGemma2ForCausalLM
    return UntiedGemma2ForCausalLM
