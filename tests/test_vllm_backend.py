"""The vllm backend on a GPU (skipped elsewhere, CI included): greedy answers equal the pt backend's,
streaming, finish reasons, the seed's commands through the CLI, a merged seed-style LoRA checkpoint,
and Gemma 2 with an untied lm_head (what merging the seed's EMBEDDING + lm_head LoRA gives)."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or not __import__("importlib").util.find_spec("vllm"),
    reason="vllm needs vllm and a CUDA GPU")]

QUESTIONS = ["浙江的省会在哪？", "What is the capital of France?", "1+1=", "你是谁？"]
VLLM_FLAGS = ["--enforce_eager", "true", "--gpu_memory_utilization", "0.2"]


def _args(*argv):
    from zhtune.args import InferArguments, parse_args
    return parse_args(InferArguments, list(argv))


def _first_words(text: str, n: int = 3) -> list[str]:
    return text.split()[:n] if " " in text else [text[:6]]


@pytest.fixture(scope="module")
def engines():
    from zhtune.infer.engine import load_engine
    from zhtune.models.resolve import resolve_model
    resolved = resolve_model("gemma3-270m")
    pt = load_engine(resolved, _args("--infer_backend", "pt", "--dtype", "bf16"))
    vllm = load_engine(resolved, _args("--infer_backend", "vllm", "--dtype", "bf16", *VLLM_FLAGS))
    return pt, vllm


def test_greedy_answers_match_pt(engines):
    from zhtune.infer.base import GenerationSettings
    pt, vllm = engines
    settings = GenerationSettings(max_new_tokens=24, do_sample=False)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    expected = pt.complete([pt.encode_prompt(c) for c in conversations], settings, batch_size=4)
    got = vllm.complete([vllm.encode_prompt(c) for c in conversations], settings)
    for a, b in zip(got, expected):
        assert _first_words(a.text) == _first_words(b.text), (a, b)
        assert a.prompt_tokens == b.prompt_tokens


def test_stream_joins_to_the_complete_reply_and_says_why_it_stopped(engines):
    from zhtune.infer.base import GenerationSettings
    _, vllm = engines
    settings = GenerationSettings(max_new_tokens=12, do_sample=False)
    prompt = vllm.encode_prompt([{"role": "user", "content": QUESTIONS[0]}])
    deltas = list(vllm.stream_ids(prompt, settings))
    whole = vllm.complete([prompt], settings)[0]
    assert "".join(d.text for d in deltas).strip() == whole.text
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].completion_tokens == whole.completion_tokens <= 12
    cut = vllm.complete([prompt], GenerationSettings(max_new_tokens=2, do_sample=False))[0]
    assert cut.finish_reason == "length" and cut.completion_tokens == 2


def test_sampling_settings_reach_vllm(engines):
    from zhtune.infer.base import GenerationSettings
    _, vllm = engines
    params = vllm.sampling_params(GenerationSettings(seed=3))
    assert (params.temperature, params.top_k, params.top_p, params.max_tokens, params.seed) == (0.3, 20, 0.7, 2048, 3)
    assert set(params.stop_token_ids) == set(vllm.stop_ids)


def test_seed_infer_command_piped_two_turns():
    result = subprocess.run([sys.executable, "-m", "zhtune", "infer", "--model_type", "gemma3-270m",
                             "--infer_backend", "vllm", "--max_new_tokens", "16", "--do_sample", "false",
                             "--verbose", "true", *VLLM_FLAGS],
                            input="浙江的省会在哪？\n这有什么好吃的？\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("-" * 50) == 2
    prompts = [line for line in result.stderr.splitlines() if line.startswith("[prompt]")]
    assert "浙江的省会在哪？" in prompts[1] and prompts[1].count("<start_of_turn>user") == 2


def test_seed_infer_command_interactive_two_turns():
    """The seed's `infer --infer_backend vllm` in a terminal (pty): two turns with history, then exit."""
    from helpers import terminal
    with terminal(["infer", "--model_type", "gemma3-270m", "--infer_backend", "vllm", "--max_new_tokens", "16",
                   "--do_sample", "false", "--verbose", "true", *VLLM_FLAGS], first_prompt_timeout=400) as chat:
        assert "-" * 50 in chat.say("浙江的省会在哪？")
        prompt2 = chat.prompt_line(chat.say("这有什么好吃的？"))
        assert "浙江的省会在哪？" in prompt2 and prompt2.count("<start_of_turn>user") == 2


def test_merged_seed_lora_checkpoint_answers_like_pt(tmp_path):
    """The seed's LoRA (EMBEDDING ALL lm_head + LN) on the embedded Gemma, merged, on vllm and on pt."""
    sft = [sys.executable, "-m", "zhtune", "sft", "--model_type", "gemma3-270m", "--dataset", "self-cognition#40",
           "--model_name", "小黄", "Xiao Huang", "--model_author", "魔搭", "ModelScope",
           "--lora_target_modules", "EMBEDDING", "ALL", "lm_head", "--lora_modules_to_save", "LN",
           "--learning_rate", "1e-3", "--max_steps", "8", "--eval_steps", "8", "--batch_size", "4",
           "--gradient_accumulation_steps", "1", "--identity_probe", "false", "--output_dir", str(tmp_path)]
    assert subprocess.run(sft, capture_output=True, text=True, timeout=600).returncode == 0
    ckpt = next(tmp_path.glob("gemma3-270m/v0-*/checkpoint-8"))
    answers = {}
    for backend in ("pt", "vllm"):
        extra = VLLM_FLAGS if backend == "vllm" else []
        run = subprocess.run([sys.executable, "-m", "zhtune", "infer", "--ckpt_dir", str(ckpt), "--merge_lora", "true",
                              "--infer_backend", backend, "--max_new_tokens", "20", "--do_sample", "false",
                              "--dtype", "bf16", *extra], input="你是谁？\n", capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        answers[backend] = run.stdout.split("-" * 50)[0].strip()
    merged = json.loads((ckpt.parent / f"{ckpt.name}-merged" / "config.json").read_text())
    assert merged.get("tie_word_embeddings") is False  # each of embedding and lm_head kept its own update
    assert _first_words(answers["vllm"]) == _first_words(answers["pt"]), answers


def test_untied_gemma2_runs_on_vllm_and_matches_transformers(tmp_path, monkeypatch):
    """vllm's own Gemma2 asserts tied embeddings; zhtune's registered class serves an untied one exactly:
    every token vllm (bf16) picks is transformers' (fp32) choice at that position, up to a bf16 near-tie,
    while a head tied to the embedding would have picked another one.
    (CUDA is already initialised in this process, so vllm would spawn its engine core, which sees
    zhtune's class only through the installed plugin entry point; in-process keeps the test
    independent of how zhtune is installed.) On the H200 (2026-11-29) exact equality with fp32 greedy
    failed at the second token of 8: a random tiny model's top logits sit closer than bf16's rounding."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from tiny_models import gemma_tokenizer_dir, tiny_config
    from transformers import AutoModelForCausalLM

    from zhtune.infer.engine import load_engine
    from zhtune.models.resolve import resolve_model

    vocab = json.loads((gemma_tokenizer_dir() / "config.json").read_text())["vocab_size"]
    config = tiny_config("gemma2", vocab)
    config.tie_word_embeddings, config.final_logit_softcapping = False, None
    config.sliding_window = 4096  # the subject is the lm_head, not the two libraries' sliding windows
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # an lm_head of its own, unlike the embedding
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 4)
    folder = tmp_path / "untied-gemma2"
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((gemma_tokenizer_dir() / name).read_bytes())
    resolved = resolve_model(None, str(folder))
    pt = load_engine(resolved, _args("--infer_backend", "pt", "--dtype", "fp32"))
    prompt = pt.encode_prompt([{"role": "user", "content": "你好"}])
    vllm = load_engine(resolved, _args("--infer_backend", "vllm", "--dtype", "bf16", *VLLM_FLAGS))
    from vllm import SamplingParams
    out = vllm.llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=8,
                                                                           ignore_eos=True))
    tokens = list(out[0].outputs[0].token_ids)
    assert len(tokens) == 8
    with torch.no_grad():  # transformers' fp32 logits at each position vllm generated, fed vllm's tokens
        run = pt.model(torch.tensor([prompt + tokens], device=pt.device), output_hidden_states=True)
    logits = run.logits[0, len(prompt) - 1:-1].float()
    chosen = torch.tensor(tokens, device=logits.device)
    gaps = logits.max(-1).values - logits.gather(-1, chosen[:, None])[:, 0]
    spread = logits.max(-1).values - logits.mean(-1)
    assert bool((gaps <= 0.02 * spread).all()), (tokens, logits.argmax(-1).tolist(), (gaps / spread).tolist())
    tied = run.hidden_states[-1][0, len(prompt) - 1:-1].float() @ pt.model.get_input_embeddings().weight.float().T
    assert tied.argmax(-1).tolist() != logits.argmax(-1).tolist()  # the check above can tell the heads apart
