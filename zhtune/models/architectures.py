"""What zhtune knows about each transformers architecture (`config.model_type`), in one record each.

Every command reads model knowledge from here: the LoRA module names behind ms-swift's keywords, the
norms `LN` trains, the softcaps that make sdpa inexact, whether the training fast path supports it,
and which registered model type a bare local folder of this architecture defaults to. Adding an
architecture is one `Architecture(...)` entry; adding a model of a known architecture is one line in
`registry.py`.
"""

from dataclasses import dataclass

_DECODER_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    name: str  # transformers' config.model_type
    default_model_type: str  # the registered model type a local folder of this architecture is taken as
    norms: tuple  # module names of the norm layers (what `--lora_modules_to_save LN` trains)
    linear: tuple = _DECODER_LINEAR  # what `--lora_target_modules ALL` adapts
    embedding: tuple = ("embed_tokens",)
    head: str = "lm_head"
    default_lora_targets: tuple = ("q_proj", "k_proj", "v_proj")  # `DEFAULT`
    # Gemma 2 caps its attention logits (tanh softcap 50): sdpa and flash kernels without a softcap
    # drop that silently, so such a model runs on flex_attention (GPU) or eager, never sdpa.
    attention_softcap: bool = False
    fast_path: bool = False  # the GPU training fast path (packing, chunked loss) supports it

    def module_names(self) -> dict:
        """The same shape as `tuners.lora.modules_of(model)`, for when no model is loaded (--dry_run)."""
        names = set(self.linear) | set(self.embedding) | set(self.norms) | {self.head}
        return {"linear": sorted(self.linear), "embedding": list(self.embedding), "norm": list(self.norms),
                "head": self.head, "all": names}


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in [
        Architecture("gemma2", "gemma2-9b-instruct", attention_softcap=True, fast_path=True,
                     norms=("input_layernorm", "norm", "post_attention_layernorm", "post_feedforward_layernorm",
                            "pre_feedforward_layernorm")),
        Architecture("gemma3_text", "gemma3-270m", fast_path=True,
                     norms=("input_layernorm", "k_norm", "norm", "post_attention_layernorm",
                            "post_feedforward_layernorm", "pre_feedforward_layernorm", "q_norm")),
        Architecture("qwen2", "qwen2.5-7b-instruct", fast_path=True,
                     norms=("input_layernorm", "norm", "post_attention_layernorm")),
        Architecture("llama", "llama3-8b-instruct",
                     norms=("input_layernorm", "norm", "post_attention_layernorm")),
    ]
}
# Multimodal Gemma 3 configs name their text part gemma3_text; a folder's config may say either.
ALIASES = {"gemma3": "gemma3_text"}


def get_architecture(name: str | None) -> Architecture | None:
    return ARCHITECTURES.get(ALIASES.get(name, name))
