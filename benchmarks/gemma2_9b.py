"""Gemma-2-9B's published config (google/gemma-2-9b-it config.json): the real shapes the speed and memory
benchmarks and the GPU scripts build their randomly initialised models from (no weights needed)."""

CONFIG = dict(
    vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
    rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False, attention_dropout=0.0, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
    tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
# for AutoConfig.for_model / a config.json
ARCHITECTURE = dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2")
