"""The pt backend's continuous-batching scheduler (zhtune/infer/batching.py): greedy tokens identical to
transformers' `generate`, per-request settings, finish reasons and counts, many threads at once,
cancellation, failures that stay in their own request; and `--val_dataset` rows without a reply."""

import json
import threading
import time

import pytest
import torch

from zhtune.infer.base import GenerationSettings
from zhtune.infer.pt_engine import PtEngine

GREEDY = dict(do_sample=False, temperature=0.0)
STOP = [1, 106]  # the gemma template's stop ids (<eos>, <end_of_turn>), as the engines use them


def hf_tokens(model, prompt, max_new_tokens, stop_ids=STOP, **kwargs):
    """transformers' generate, batch 1, dynamic cache: the reference."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_k=None, top_p=None,
                             eos_token_id=stop_ids, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def make_engine(model, tokenizer, **kwargs):
    from zhtune.templates import get_template
    return PtEngine(model, tokenizer, get_template("gemma", tokenizer), name="test", model_type="test", **kwargs)


def tokens_of(engine, prompt, settings, seed=None):
    return engine.scheduler.submit(engine._request(prompt, settings, seed)).result(timeout=60)


@pytest.fixture(scope="module")
def tiny(tiny_models, gemma_tokenizer):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    assert model.config.attn_logit_softcapping and model.config.sliding_window == 8
    return model, gemma_tokenizer


@pytest.fixture(scope="module")
def tiny_engine(tiny):
    return make_engine(*tiny)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 5000, (n,), generator=g).tolist() for n in (5, 23, 1, 40, 11, 17, 9, 31)]


@pytest.fixture(scope="module")
def embedded():
    from zhtune.models.loader import load_model_and_tokenizer
    from zhtune.models.resolve import resolve_model
    from zhtune.templates import get_template
    resolved = resolve_model("gemma3-270m")
    model, tokenizer = load_model_and_tokenizer(resolved, "fp32", device="cpu")
    return PtEngine(model.eval(), tokenizer, get_template(resolved.template, tokenizer), name="gemma3-270m",
                    model_type="gemma3-270m")


QUESTIONS = ["浙江的省会在哪？", "What is 17 + 25?", "用一句话介绍你自己。", "Name three primary colors.",
             "写一首关于秋天的短诗。", "Why is the sky blue?", "把“你好”翻译成英文。", "List the planets of the solar system."]


# -- exactness ---------------------------------------------------------------------------------------

def test_tiny_gemma2_greedy_matches_generate_batched_mixed_lengths(tiny, tiny_engine, prompts):
    """Softcap + sliding window 8 with prompts up to 40 tokens, all decoded together, each its own length."""
    model, _ = tiny
    settings = GenerationSettings(max_new_tokens=24, **GREEDY)
    requests = [tiny_engine.scheduler.submit(tiny_engine._request(p, GenerationSettings(max_new_tokens=12 + 2 * i,
                                                                                        **GREEDY), None))
                for i, p in enumerate(prompts)]
    for i, (p, r) in enumerate(zip(prompts, requests)):
        assert r.result(timeout=60) == hf_tokens(model, p, 12 + 2 * i), f"prompt {i} ({len(p)} tokens)"
    assert tiny_engine.scheduler.stats["decode_tokens"] > tiny_engine.scheduler.stats["decode_steps"]  # batched
    # the same through complete(): texts, counts and finish reasons as the plain generate path
    fast = tiny_engine.complete(prompts, settings, batch_size=4)
    plain = tiny_engine._hf_complete(prompts, settings, batch_size=1)
    assert fast == plain


def test_prompts_arriving_together_are_prefilled_together(tiny, prompts):
    """Eight prompts of 1..40 tokens queued before the scheduler runs: right-padded into a few prefill
    forwards (at most 64 padded tokens each here), every reply exactly as alone with generate."""
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch_size=8)
    scheduler = engine.scheduler
    scheduler.prefill_tokens = 64
    settings = GenerationSettings(max_new_tokens=12, **GREEDY)
    requests = [engine._request(p, settings, None) for p in prompts]
    with scheduler.cond:  # all queued before the loop looks
        for r in requests:
            scheduler.submit(r)
    assert [r.result(timeout=60) for r in requests] == [hf_tokens(model, p, 12) for p in prompts]
    assert 1 < scheduler.stats["prefill_forwards"] < len(prompts)


def test_tiny_gemma2_batch_of_one(tiny, prompts):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch_size=1)
    settings = GenerationSettings(max_new_tokens=20, **GREEDY)
    for p in prompts[3:5]:
        assert tokens_of(engine, p, settings) == hf_tokens(model, p, 20)
    assert engine.scheduler.cache.slots == 1


def test_repetition_penalty_and_top_k_1_match_generate(tiny, tiny_engine, prompts):
    model, _ = tiny
    p = prompts[1]
    assert tokens_of(tiny_engine, p, GenerationSettings(max_new_tokens=16, repetition_penalty=1.3, **GREEDY)) == \
        hf_tokens(model, p, 16, repetition_penalty=1.3)
    sampled_top1 = GenerationSettings(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=1, top_p=0.9)
    assert tokens_of(tiny_engine, p, sampled_top1, seed=3) == hf_tokens(model, p, 16)


def test_compiled_decode_step_gives_the_same_tokens(tiny, prompts, monkeypatch):
    """torch.compile of the decode step (aot_eager here: traces like inductor, no C++ build), dynamic
    rows and key lengths: no recompilation per prompt length, same greedy tokens."""
    monkeypatch.setenv("ZHTUNE_PT_COMPILE_BACKEND", "aot_eager")
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, compile="default", max_batch_size=4)
    assert engine.warm_up(rows=(4,), slots=4, length=96) > 0
    assert engine.scheduler._compiled is not None
    settings = GenerationSettings(max_new_tokens=20, **GREEDY)
    requests = [engine.scheduler.submit(engine._request(p, settings, None)) for p in prompts[:6]]
    for p, r in zip(prompts, requests):
        assert r.result(timeout=60) == hf_tokens(model, p, 20)
    assert engine.scheduler._decode is not engine.scheduler._forward_decode  # still compiled, no fallback


def test_compiled_prefill_gives_the_same_tokens_without_a_graph_break(tiny, prompts, monkeypatch):
    """The prefill's decoder layers through torch.compile (on with CUDA graphs; aot_eager here): 8 prompts of 1..40 tokens,
    one and several per forward, more requests than slots, the decode step compiled too: the tokens of
    `generate`, no graph per prompt length, no graph break, no fallback to eager."""
    import torch._dynamo
    from zhtune.infer.batching import Request, Scheduler
    monkeypatch.setenv("ZHTUNE_PT_COMPILE_BACKEND", "aot_eager")
    model, _ = tiny
    expected = [hf_tokens(model, p, 12) for p in prompts]
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    breaks, graphs = sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]
    scheduler = Scheduler(model, max_slots=3, compile="default", compile_prefill=True)
    assert scheduler.warm_up_prefill() > 0 and scheduler._prefill_compiled_once  # dummy rows into slots 0, 1
    requests = [scheduler.submit(Request(list(p), 12)) for p in prompts]
    try:
        assert [r.result(timeout=120) for r in requests] == expected
    finally:
        scheduler.close()
    assert scheduler.compile_prefill and scheduler._prefill_compiled_once  # compiled, not fallen back
    assert scheduler.stats["prefill_forwards"] < len(prompts)  # some forwards held several prompts
    assert sum(counters["graph_break"].values()) == breaks
    # the decode step's one graph (compile="default") and two of the prefill's (one row, several rows: 1 is a
    # size torch.compile specialises): none per prompt length
    assert counters["stats"]["unique_graphs"] - graphs <= 3


def test_the_compiled_step_compiles_once_for_every_shape():
    """What the CUDA-graph mode captures on a GPU: the decoder layers compiled one at a time (the
    embedding, final norm, lm_head and softcap stay eager), one compiled graph for every layer of a kind,
    every rows x keys bucket and cache growth (each recompilation costs a minute or more with inductor on
    a real model; a layer index guarded as a constant would recompile per layer), same logits."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from tiny_models import tiny_config
    from zhtune.infer.batching import Scheduler
    from zhtune.models.parts import decoder_layers
    torch.manual_seed(0)
    config = tiny_config("gemma2", 4096, layers=6)  # sliding and full attention layers, alternating
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    layers = decoder_layers(model)
    assert layers is not None and len(layers) == 6
    torch._dynamo.reset()
    scheduler = Scheduler(model, max_slots=8, compile="0")
    scheduler.cache.ensure(8, 64)
    scheduler.cache.mark_static()  # as on CUDA: static buffer addresses must not become per-layer guards
    step = scheduler.compile_step("eager")
    counters = torch._dynamo.utils.counters
    before, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    with torch.no_grad():
        for rows, keys, grow in [(2, 32, None), (4, 32, None), (8, 64, None), (2, 64, (8, 128)), (8, 128, (16, 128))]:
            if grow:
                scheduler.cache.ensure(*grow)
                scheduler.cache.mark_static()
            ids = torch.randint(3, 4000, (rows, 1))
            positions = torch.full((rows, 1), keys - 1)
            kv_index = scheduler._kv_index(keys).clone()
            torch.testing.assert_close(step(ids, positions, kv_index),
                                       scheduler._forward_decode(ids, positions, kv_index))
    graphs = counters["stats"]["unique_graphs"] - before
    assert 1 <= graphs <= len(set(config.layer_types))  # at most one per kind of layer, not one per layer
    assert sum(counters["graph_break"].values()) == breaks
    assert all("forward" not in layer.__dict__ for layer in layers)  # the layers are the model's own again


def test_embedded_model_greedy_matches_generate(embedded):
    """The real Gemma 3 270M: chat prompts, all at once, against plain generate one by one; streaming too."""
    settings = GenerationSettings(max_new_tokens=12, **GREEDY)
    prompts = [embedded.encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    fast = embedded.complete(prompts, settings, batch_size=8)
    plain = embedded._hf_complete(prompts, settings, batch_size=1)
    assert fast == plain
    assert any(c.finish_reason == "stop" for c in fast) or all(c.completion_tokens == 12 for c in fast)
    deltas = list(embedded.stream_ids(prompts[0], settings))
    assert "".join(d.text for d in deltas).strip() == fast[0].text
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == (fast[0].finish_reason,
                                                                        fast[0].completion_tokens)


def test_concurrent_requests_batch_together_and_beat_serial(embedded):
    """10 requests of 8 new tokens from 10 threads: decoded together, each exactly as alone, sooner than one
    by one (benchmarks: 20 x 16 tokens on 2 CPU cores, see GPU_RUN.md)."""
    n = 10
    settings = GenerationSettings(max_new_tokens=8, **GREEDY)
    prompts = [embedded.encode_prompt([{"role": "user", "content": f"{QUESTIONS[i % 8]} ({i})"}]) for i in range(n)]
    embedded.complete(prompts[:1], settings)  # warm
    start = time.perf_counter()
    serial = [embedded._hf_complete([p], settings, batch_size=1)[0] for p in prompts]
    serial_s = time.perf_counter() - start
    results, errors = [None] * n, []

    def ask(i):
        try:
            results[i] = embedded.complete([prompts[i]], settings, batch_size=1)[0]
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    steps_before = dict(embedded.scheduler.stats)
    start = time.perf_counter()
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    batched_s = time.perf_counter() - start
    assert not errors and results == serial
    stats = embedded.scheduler.stats
    steps = stats["decode_steps"] - steps_before["decode_steps"]
    tokens = stats["decode_tokens"] - steps_before["decode_tokens"]
    print(f"{n} x 8 tokens: serial generate {serial_s:.2f}s, concurrent {batched_s:.2f}s "
          f"({serial_s / batched_s:.1f}x); {tokens / steps:.1f} requests per decode step")
    assert tokens / steps > 4
    assert batched_s < serial_s


# -- per-request settings and finish reasons ---------------------------------------------------------

def test_per_request_max_new_tokens_and_stop(tiny, prompts):
    model, tokenizer = tiny
    p = prompts[3]
    reference = hf_tokens(model, p, 12)
    stop = reference[5]
    first = reference.index(stop)
    engine = make_engine(model, tokenizer)
    engine.stop_ids = [stop]
    engine.scheduler.stop_ids = frozenset([stop])
    plain = engine._hf_complete([p, p], GenerationSettings(max_new_tokens=12, **GREEDY))
    fast = engine.complete([p, p, prompts[0]], GenerationSettings(max_new_tokens=12, **GREEDY))
    assert fast[:2] == plain
    assert fast[0].finish_reason == "stop" and fast[0].completion_tokens == first + 1
    short = engine.complete([p], GenerationSettings(max_new_tokens=first, **GREEDY))[0]
    assert (short.finish_reason, short.completion_tokens) == ("length", first)
    one = engine.complete([p], GenerationSettings(max_new_tokens=1, **GREEDY))[0]
    assert (one.finish_reason, one.completion_tokens) == ("length", 1) or first == 0


def greedy_run_results(model, cases, stop, **scheduler_kwargs) -> dict:
    """{greedy_run: (tokens per case, finish reasons, scheduler stats)} for one step per read (1) and runs of 8."""
    from zhtune.infer.batching import Request, Scheduler
    results = {}
    for run in (1, 8):
        scheduler = Scheduler(model, compile="0", greedy_run=run, **scheduler_kwargs)
        scheduler.stop_ids = frozenset([stop])
        requests = [Request(list(p), n) for p, n in cases]
        for r in requests:
            scheduler.submit(r)
        results[run] = ([r.result(timeout=60) for r in requests], [r.finish_reason for r in requests],
                        dict(scheduler.stats))
        scheduler.close()
    return results


def test_greedy_runs_give_the_tokens_of_single_steps_with_one_host_read_per_run(tiny, prompts):
    """Greedy steps run back to back (the next token fed on the device, the host reading a run's tokens once):
    the same tokens as one step at a time and as `generate`, with a stop token inside a run, replies of
    different lengths ending mid-run, and key buckets crossed (32 keys per bucket on the CPU); far fewer
    host reads than steps."""
    model, _ = tiny
    long_prompt = prompts[3]  # 40 tokens: its keys cross the 64-key bucket boundary while decoding
    stop = hf_tokens(model, long_prompt, 30, stop_ids=[])[13]
    cases = [(long_prompt, 30), (prompts[0], 19), (prompts[1], 7), (prompts[5], 26)]
    results = greedy_run_results(model, cases, stop, max_slots=4)
    assert results[8][:2] == results[1][:2]
    for (p, n), tokens in zip(cases, results[8][0]):
        assert tokens == hf_tokens(model, p, n, stop_ids=[stop])
    assert results[8][1][0] == "stop" and len(results[8][0][0]) == 14  # stopped inside a run
    single, runs = results[1][2], results[8][2]
    assert single["decode_reads"] == single["decode_steps"]
    assert runs["decode_reads"] * 3 < runs["decode_steps"], runs


def test_greedy_runs_while_requests_wait_for_a_slot(tiny, prompts):
    """More requests than slots: while some wait, greedy runs stay short (`greedy_run_waiting`) and end at the
    first reply that ends by length, so its slot is refilled right after the run; a stop token inside a run
    ends that reply there. Same tokens as one step per read and as `generate`, fewer reads than steps."""
    model, _ = tiny
    stop = hf_tokens(model, prompts[3], 30, stop_ids=[])[9]
    cases = [(prompts[3], 30), (prompts[0], 5), (prompts[1], 17), (prompts[5], 11), (prompts[2], 9),
             (prompts[4], 13)]
    results = greedy_run_results(model, cases, stop, max_slots=2, greedy_run_waiting=3)
    assert results[8][:2] == results[1][:2]
    for (p, n), tokens in zip(cases, results[8][0]):
        assert tokens == hf_tokens(model, p, n, stop_ids=[stop])
    assert results[8][1][0] == "stop"
    single, runs = results[1][2], results[8][2]
    assert single["decode_reads"] == single["decode_steps"]
    assert runs["decode_reads"] < runs["decode_steps"] * 0.6, runs


@pytest.mark.parametrize("arch", ["gemma2", "qwen2"])
def test_fused_weights_decode_the_same_tokens_and_undo(tiny_models, prompts, tmp_path, arch):
    """The generation levers that read each MLP's gate and up projections, and each attention block's q, k and v
    (with Qwen2's biases), as one weight: the same greedy tokens as `generate` on the unfused model, eager and
    through the compiled per-layer decode step (no graph break), no extra weight memory, and after undoing them
    the model saves as before."""
    import torch._dynamo
    from transformers import AutoModelForCausalLM

    from zhtune.infer.batching import Request, Scheduler
    from zhtune.infer.fused_weights import fuse_gate_up, fuse_qkv, unfuse_gate_up, unfuse_qkv
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch], dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    references = [hf_tokens(model, p, 12, stop_ids=[]) for p in prompts[:4]]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    storage = sum(p.untyped_storage().nbytes() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    assert fuse_gate_up(model) == n_layers and fuse_qkv(model) == n_layers
    assert all("_gate_up_weight" in layer.mlp.__dict__ for layer in model.model.layers)
    distinct = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(distinct.values()) == storage  # the fused weights hold the parts: nothing copied twice
    assert len(distinct) < len(list(model.parameters()))
    scheduler = Scheduler(model, max_slots=4, compile="0")
    requests = [scheduler.submit(Request(list(p), 12)) for p in prompts[:4]]
    assert [r.result(timeout=60) for r in requests] == references
    scheduler.close()

    torch._dynamo.reset()  # the compiled decode step over the fused projections
    scheduler = Scheduler(model, max_slots=4, compile="0")
    scheduler.cache.ensure(4, 64)
    step = scheduler.compile_step("eager")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    with torch.no_grad():
        for rows in (1, 4):
            ids, positions = torch.randint(3, 4000, (rows, 1)), torch.full((rows, 1), 31)
            kv_index = scheduler._kv_index(32).clone()
            torch.testing.assert_close(step(ids, positions, kv_index), scheduler._forward_decode(ids, positions, kv_index))
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == breaks

    assert unfuse_gate_up(model) == n_layers and unfuse_qkv(model) == n_layers
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())
    model.save_pretrained(tmp_path / "saved")  # no storage shared between tensors any more
    assert hf_tokens(model, prompts[0], 12, stop_ids=[]) == references[0]


def test_mixed_settings_from_threads(tiny, tiny_engine, prompts):
    """Greedy and sampled requests with their own max_new_tokens and seeds, interleaved: each as asked."""
    model, _ = tiny
    out = {}

    def run(i):
        if i % 2:
            s = GenerationSettings(max_new_tokens=5 + i, do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=i)
        else:
            s = GenerationSettings(max_new_tokens=5 + i, **GREEDY)
        out[i] = tokens_of(tiny_engine, prompts[i % 8], s, seed=s.seed)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(12):
        assert len(out[i]) == 5 + i
        if i % 2 == 0:
            assert out[i] == hf_tokens(model, prompts[i % 8], 5 + i)
    again = tokens_of(tiny_engine, prompts[1], GenerationSettings(max_new_tokens=6, do_sample=True, temperature=0.9,
                                                                   top_k=50, top_p=0.9), seed=1)
    assert again == out[1]  # same seed, same prompt: same sample, whatever else was in the batch


# -- cancellation and failures -------------------------------------------------------------------------

def wait_idle(scheduler, timeout=20):
    deadline = time.time() + timeout
    while (scheduler.active or scheduler.pending) and time.time() < deadline:
        time.sleep(0.01)
    return not (scheduler.active or scheduler.pending)


def test_a_stream_closed_early_frees_its_slot(tiny, prompts):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer, max_batch_size=2)
    settings = GenerationSettings(max_new_tokens=2000, **GREEDY)
    stream = engine.stream_ids(prompts[0], settings)
    got = 0
    for delta in stream:
        got += 1
        if got == 3:
            break
    stream.close()
    assert wait_idle(engine.scheduler)
    assert engine.scheduler.stats["decode_tokens"] < 400
    # a complete() interrupted mid-way (an error in one prompt) cancels the rest too
    assert engine.complete([prompts[1]], GenerationSettings(max_new_tokens=3, **GREEDY))[0].completion_tokens == 3


def test_a_failing_request_raises_in_its_caller_and_does_not_wedge(tiny, prompts):
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=30, **GREEDY)
    good = engine.scheduler.submit(engine._request(prompts[2], settings, None))
    with pytest.raises((IndexError, RuntimeError)):
        engine.complete([[10**9]], settings)  # a token id outside the vocabulary
    with pytest.raises(ValueError, match="empty prompt"):
        engine.complete([[]], settings)
    assert good.result(timeout=60) == hf_tokens(model, prompts[2], 30)
    # a decode step that fails: the requests in it fail, the next ones are served
    original = engine.scheduler._run_decode
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return original(*args)

    engine.scheduler._run_decode = flaky
    with pytest.raises(RuntimeError, match="injected"):
        list(engine.stream_ids(prompts[4], settings))
    assert engine.complete([prompts[4]], GenerationSettings(max_new_tokens=8, **GREEDY))[0].completion_tokens == 8
    assert wait_idle(engine.scheduler)


def test_beam_search_still_goes_through_generate(tiny, tiny_engine, prompts):
    model, _ = tiny
    settings = GenerationSettings(max_new_tokens=6, num_beams=2, **GREEDY)
    out = tiny_engine.complete([prompts[0]], settings)[0]
    assert out.completion_tokens == 6 and out.finish_reason == "length"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("levers", [False, True], ids=["plain", "fused-weights-compiled-prefill"])
def test_gpu_compiled_greedy_matches_generate_first_64_tokens(levers, monkeypatch):
    """The embedded model on the GPU, compiled decode step (CUDA graphs): 8 prompts, 64 tokens, in fp32;
    then again with the engine's levers: gate/up and q/k/v fused (infer/eval/deploy's default) and the
    compiled prefill (both on by default with CUDA graphs).

    fp32, because this checks the algorithm (cache, masks, buckets, graphs), not bf16 rounding: on the H200
    (2026-11-29) in bf16 the compiled step's equivalent kernels split a greedy near-tie against `generate`
    at token 8 (sdpa reference) and at token 37 (eager reference) of a prompt; in fp32 all 8 prompts match.
    bf16 equality over 64 tokens is benchmarks/infer_speed.py's 8/8 on the Gemma-2-9B config."""
    from zhtune.models.loader import load_model_and_tokenizer
    from zhtune.models.resolve import resolve_model
    from zhtune.templates import get_template
    resolved = resolve_model("gemma3-270m")
    # the reference runs eager attention: the operations the scheduler's grouped attention performs
    model, tokenizer = load_model_and_tokenizer(resolved, "fp32", device="cuda", attn_implementation="eager")
    monkeypatch.setenv("ZHTUNE_PT_COMPILE_PREFILL", "1" if levers else "0")
    engine = PtEngine(model.eval(), tokenizer, get_template(resolved.template, tokenizer), name="g", model_type="g",
                      fuse_weights=levers)
    engine.stop_ids = []  # 64 tokens each, whatever they are
    model.generation_config.eos_token_id = None
    prompts = [engine.encode_prompt([{"role": "user", "content": q}]) for q in QUESTIONS]
    refs = []  # the stock model's, before the engine's scheduler (made on first use) fuses any weight
    for p in prompts:
        with torch.no_grad():
            refs.append(model.generate(input_ids=torch.tensor([p], device="cuda"), max_new_tokens=64, do_sample=False,
                                       temperature=None, top_k=None, top_p=None, eos_token_id=None)[0, len(p):].tolist())
    assert (engine.scheduler.fused_layers > 0) == levers and engine.scheduler.compile_prefill == levers
    engine.scheduler.stop_ids = frozenset()
    engine.warm_up(rows=(1, 8), slots=8, length=512)
    settings = GenerationSettings(max_new_tokens=64, **GREEDY)
    for p, ref in zip(prompts, refs):  # batch of one (interactive), then all eight together
        assert tokens_of(engine, p, settings) == ref
    requests = [engine.scheduler.submit(engine._request(p, settings, None)) for p in prompts]
    results = [r.result(timeout=300) for r in requests]
    assert all(len(r) == 64 for r in results)
    assert engine.scheduler.compile_prefill == levers  # no fallback to the eager prefill


# -- --val_dataset rows without a reply --------------------------------------------------------------

def test_rows_without_a_reply_are_prompts_for_inference_only():
    from zhtune.data.formats import RowError, to_row
    assert to_row({"query": "q"}, "query/response", replies_optional=True)["messages"] == \
        [{"role": "user", "content": "q"}]
    assert to_row({"instruction": "i", "input": "x"}, "alpaca", replies_optional=True)["messages"] == \
        [{"role": "user", "content": "i\nx"}]
    ending_on_user = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "user", "content": "c"}]}
    assert len(to_row(ending_on_user, "messages", replies_optional=True)["messages"]) == 3
    assert to_row({"query": "q", "response": ""}, "query/response", replies_optional=True)["messages"] == \
        [{"role": "user", "content": "q"}]
    for record, fmt in ((ending_on_user, "messages"), ({"query": "q"}, "query/response"),
                        ({"instruction": "i"}, "alpaca")):
        with pytest.raises(RowError):
            to_row(record, fmt)  # training still needs the reply


def test_infer_val_dataset_with_and_without_replies(tiny_models, tmp_path):
    from zhtune.cli import main
    rows = [{"query": "浙江的省会在哪？"},
            {"query": "江苏的省会在哪？", "response": "南京。"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                          {"role": "user", "content": "再见"}]}]
    files = []
    for i, group in enumerate((rows[:2], rows[2:])):  # a file's format comes from its first row
        path = tmp_path / f"q{i}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in group), encoding="utf-8")
        files.append(str(path))
    out = tmp_path / "out"
    assert main(["infer", "--model_id_or_path", str(tiny_models["gemma2"]),
                 "--val_dataset", *files, "--max_new_tokens", "3", "--do_sample", "false", "--infer_backend", "pt",
                 "--result_dir", str(out)]) == 0
    written = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [r["label"] for r in written] == [None, "南京。", None]
    assert written[2]["history"] == [["hi", "hello"]] and written[2]["query"] == "再见"
    assert all(isinstance(r["response"], str) for r in written)


# -- the benchmark, tiny on the CPU ------------------------------------------------------------------

def test_infer_speed_benchmark_tiny(tmp_path):
    from helpers import load_benchmark
    bench = load_benchmark("infer_speed")
    out = tmp_path / "r.json"
    assert bench.main(["--tiny", "--profile", "--profile_batched", "6", "--batched_single_reads", "--other_prefill",
                       "--weight_fusion",
                       "--one_row_options",
                       '{"max_autotune": true}',
                       "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("date", "device", "bs1_decode_tokens_per_s", "batched_tokens_per_s",
                "hf_generate_batched_tokens_per_s", "batched_speedup_vs_hf", "bs1_bandwidth_limit_tokens_per_s"):
        assert key in r, key
    assert r["greedy_match"]["identical"] == r["greedy_match"]["prompts"]
    assert r["bs1_one_step_per_read"]["new_tokens"] == r["bs1"]["new_tokens"] == 32  # runs and single steps
    assert r["bs1_profile"]["new_tokens"] == 64 and r["bs1_profile"]["wall_ms_per_token"] > 0
    single_reads = r["batched_one_read_per_step_while_waiting"]  # the same replies, the previous read policy
    assert single_reads["replies_identical_to_default"] == single_reads["replies"] == r["batched"]["prompts"]
    compiled_prefill = r["batched_compiled_prefill"]  # eager by default on the CPU; no compilation there: eager
    assert compiled_prefill["replies_identical_to_default"] == compiled_prefill["replies"]
    assert compiled_prefill["compiled"] is False
    profiled = r["batched_profile"]  # the first 6 prompts again, their steps and forwards counted
    assert profiled["prompts"] == 6 and profiled["scheduler_stats"]["prefill_forwards"] >= 1
    assert profiled["scheduler_stats"]["decode_tokens"] > 0 and profiled["new_tokens"] > 0
    assert r["fused_blocks"] == 0  # the weights are fused for CUDA graphs only: the other states are measured
    fused = r["bs1_weight_fusion"]
    assert [(name, f["blocks_fused"], f["tokens_identical_to_default"]) for name, f in fused.items()] == \
        [("gate_up", [2], True), ("gate_up_qkv", [2, 2], True)]
    options = r["bs1_one_row_options"]  # each option set, then the default's again
    assert [o["options"] for o in options] == [{"max_autotune": True}, {"coordinate_descent_tuning": True}]
    assert all(o["tokens_identical_to_default"] and o["decode_tokens_per_s"] > 0 for o in options)
    # the vllm run needs vllm and a GPU: a clear refusal (exit 2), no file written
    assert bench.main(["--tiny", "--engine", "vllm", "--out", str(tmp_path / "v.json")]) == 2
    assert not (tmp_path / "v.json").exists()


def test_lora_adapter_model_matches_generate(tiny_models, gemma_tokenizer, prompts):
    """A PeftModel (base + LoRA, as `infer --ckpt_dir` loads it) through the scheduler: same greedy tokens."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_models["gemma2"], dtype=torch.float32, attn_implementation="eager")
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    engine = make_engine(model, gemma_tokenizer)
    assert engine.batching
    settings = GenerationSettings(max_new_tokens=16, **GREEDY)
    assert engine.complete(prompts[:3], settings) == engine._hf_complete(prompts[:3], settings, batch_size=1)


def test_progress_bar_shows_tokens_per_second_before_any_reply_finishes(tiny, prompts, capsys):
    """Eval and batch infer show items and output tokens/s; a long batch (every reply still running) must
    not sit silent until its first reply ends. A forward hook slows the tiny model to ~20 steps/s."""
    import time
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer)
    engine.stop_ids = []
    engine.scheduler.stop_ids = frozenset()
    hook = model.register_forward_pre_hook(lambda *_: time.sleep(0.05))
    try:
        out = engine.complete(prompts[:4], GenerationSettings(max_new_tokens=40, **GREEDY), batch_size=4,
                              progress=True)
    finally:
        hook.remove()
    assert [c.completion_tokens for c in out] == [40] * 4
    bar = capsys.readouterr().err
    assert any(" 0/4 " in line and "tokens/s" in line for line in bar.split("\r")), bar[-500:]


def test_close_stops_the_scheduler_thread_and_a_later_request_restarts_it(tiny, prompts):
    """At exit (atexit) the scheduler thread is stopped and joined: a daemon thread left inside a torch op
    while the interpreter finalizes aborted `zhtune infer` once (exit -6, "terminate called without an
    active exception"). Requests still running when it closes end as cancelled, never hang."""
    model, tokenizer = tiny
    engine = make_engine(model, tokenizer)
    settings = GenerationSettings(max_new_tokens=6, **GREEDY)
    first = engine.complete(prompts[:2], settings)
    scheduler = engine.scheduler
    assert scheduler.thread.is_alive()
    long = scheduler.submit(engine._request(prompts[2], GenerationSettings(max_new_tokens=10_000, **GREEDY), None))
    scheduler.close()
    assert not scheduler.thread.is_alive()
    long.result(timeout=5)  # returns (cancelled) instead of waiting for 10,000 tokens
    assert long.finish_reason == "cancelled"
    assert engine.complete(prompts[:2], settings) == first  # a new request starts the thread again
    scheduler.close()


EXIT_WHILE_GENERATING = """
import sys, torch
from transformers import AutoModelForCausalLM, Gemma2Config
sys.path.insert(0, sys.argv[1])
import infer_speed
from zhtune.infer.batching import Request, Scheduler
model = AutoModelForCausalLM.from_config(Gemma2Config(**infer_speed.TINY), dtype=torch.float32,
                                         attn_implementation="eager").eval()
scheduler = Scheduler(model, max_slots=8, max_len=512, compile="0")
scheduler.submit(Request(list(range(3, 40)), 5)).result()
scheduler.submit(Request(list(range(3, 200)), 400))  # still generating when the interpreter exits
print("leaving")
"""


def test_the_process_exits_cleanly_while_a_generation_is_running():
    """Leaving while the scheduler thread is inside a forward (Ctrl-D during a reply, a server stopping)
    used to abort the process: exit -6, "terminate called without an active exception" (every time
    in this setup before the at-exit close)."""
    import subprocess
    import sys
    from pathlib import Path
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    result = subprocess.run([sys.executable, "-c", EXIT_WHILE_GENERATING, str(benchmarks)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "leaving" in result.stdout and "terminate called" not in result.stderr


def test_one_row_step_serves_batch_one_and_batches_keep_the_dynamic_step(tiny):
    """On a GPU a lone request decodes through a step compiled for exactly one row (autotuned GEMVs). A
    batch workload that has not decoded a lone request yet keeps its single-row tail on the multi-row
    step instead of compiling the one-row step near its end. Same tokens either way."""
    from zhtune.infer.batching import Request, Scheduler
    model, _ = tiny

    def decode_rows(scheduler, batch):
        seen = []
        run_decode = scheduler._run_decode

        def recording(ids, pos, kv_index):
            seen.append(ids.shape[0])
            return run_decode(ids, pos, kv_index)
        scheduler._run_decode = recording
        # slot 0's reply is the longest: it ends the run alone, as the sole row of the last steps
        requests = [scheduler.submit(Request(list(range(3, 12 + 5 * i)), 24 - 9 * i)) for i in range(batch)]
        tokens = [r.result(timeout=60) for r in requests]
        scheduler._run_decode = run_decode
        return seen, tokens

    batch = Scheduler(model, max_slots=4, compile="0", greedy_run=1)
    batch.one_row_autotune = True  # as on a GPU with CUDA graphs; the CPU has no graphs to compile
    rows, batched_tokens = decode_rows(batch, 3)
    assert min(rows) == 2 and rows[-1] == 2, rows  # the last request decoded alone, as 2 rows
    batch.close()

    lone = Scheduler(model, max_slots=4, compile="0", greedy_run=1)
    lone.one_row_autotune = True
    rows, tokens = decode_rows(lone, 1)
    assert set(rows) == {1}
    rows, tokens_after = decode_rows(lone, 3)  # its one-row step exists: a batch's tail may use it
    assert rows[-1] == 1 and tokens_after == batched_tokens
    assert tokens == [hf_tokens(model, list(range(3, 12)), 24, stop_ids=[])] == batched_tokens[:1]
    lone.close()
