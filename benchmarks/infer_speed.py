"""Generation speed of the pt backend (zhtune/infer/batching.py) against transformers' `generate`, on
Gemma-2-9B with random weights, bf16, one GPU, exact softcap (eager attention), in one run.

    python benchmarks/infer_speed.py --quick    # < 8 minutes on an H200, warm-up included
    python benchmarks/infer_speed.py            # the full workloads
    python benchmarks/infer_speed.py --tiny     # a tiny Gemma 2 on the CPU, seconds (the test suite runs it)
    python benchmarks/infer_speed.py --quick --engine vllm   # vllm on the same workloads (where staged)

Workloads
  (a) interactive: a 256-token prompt, 256 new tokens, batch 1. Decode tokens/s (after the first token)
      and time to first token (submit -> first token: prefill + one token choice). The same with HF
      `generate` (dynamic cache) for reference.
  (b) eval-like: prompts of mixed lengths (log-uniform 64..1024 tokens, random ids), greedy, each reply
      ending at its drawn length: max_new_tokens per request = the length of a real answer (the
      assistant tokens of the 1000 alpaca_zh_demo rows, benchmarks/alpaca_zh_lengths.json), capped at
      256; end-of-turn is ignored so that every engine makes exactly the same tokens. Total new
      tokens/s = sum of the drawn lengths / wall time. The scheduler gets all prompts at once
      (--batch_size slots); the baseline is HF `generate` with its dynamic cache at the same batch size,
      prompts in batches by length (as the old pt engine did), each batch running to its longest
      drawn reply (what static batching costs). The speedup compares both on the same prompts
      (--hf_prompts of them, the first ones of the same draw).
  Exactness: 8 fixed prompts, greedy, the first 64 tokens of the scheduler (compiled, batch 1) against
      HF `generate` batch 1.
  Limit: batch-1 decoding reads every weight once per token: 4.8 TB/s / bytes of weights.

Results: --out (default benchmarks/results/<date>-infer-speed[-quick|-tiny].json), written after every
phase so that a run cut short still leaves its numbers. Keys: date, device, bs1_decode_tokens_per_s,
bs1_ttft_s, batched_tokens_per_s, hf_generate_batched_tokens_per_s, batched_speedup_vs_hf,
bs1_bandwidth_limit_tokens_per_s, weight_bytes, greedy_match, and the details of each phase.
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # kernel_profile, gemma2_9b

from zhtune.infer.batching import Request, Scheduler  # noqa: E402
from zhtune.log import setup_logging  # noqa: E402
import gemma2_9b  # noqa: E402
from kernel_profile import device_profile  # noqa: E402

GEMMA2_9B = gemma2_9b.CONFIG
TINY = dict(GEMMA2_9B, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
LENGTHS = Path(__file__).resolve().parent / "alpaca_zh_lengths.json"
HBM_BYTES_PER_S = 4.8e12  # H200

PROFILES = {  # prompts, hf_prompts, bs1 new tokens, hf bs1 new tokens, match prompts x tokens, prompt range
    "full": dict(prompts=1000, hf_prompts=256, bs1_new=256, hf_bs1_new=128, match=(8, 64), lo=64, hi=1024, cap=256),
    "quick": dict(prompts=320, hf_prompts=96, bs1_new=256, hf_bs1_new=64, match=(8, 64), lo=64, hi=1024, cap=256),
    "tiny": dict(prompts=40, hf_prompts=16, bs1_new=32, hf_bs1_new=32, match=(8, 24), lo=4, hi=48, cap=24),
}


def say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def build_model(tiny: bool):
    from transformers import AutoModelForCausalLM, Gemma2Config
    device = "cpu" if tiny else "cuda"
    config = Gemma2Config(**(TINY if tiny else GEMMA2_9B))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if tiny else torch.bfloat16,
                                                 attn_implementation="eager")
    model.generation_config.eos_token_id = None  # replies end at their drawn length, in every engine
    return model.eval(), device


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # the tied lm_head counts once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def draw_workload(n: int, vocab: int, lo: int, hi: int, cap: int, seed: int = 0):
    rng = random.Random(seed)
    answers = [trained for _, trained in json.loads(LENGTHS.read_text())["samples"] if trained > 0]
    prompts, replies = [], []
    for _ in range(n):
        length = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        prompts.append([rng.randrange(3, vocab) for _ in range(length)])
        replies.append(max(1, min(cap, rng.choice(answers))))
    return prompts, replies


def draw_bs1_prompt(profile: dict, vocab: int):
    """Workload (a)'s prompt, and the generator that drew it."""
    rng = random.Random(1)
    return [rng.randrange(3, vocab) for _ in range(profile["hi"] // 4)], rng


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# -- the scheduler ---------------------------------------------------------------------------------------

def run_scheduler(scheduler: Scheduler, prompts, replies, label: str, every: float = 10.0):
    finished = []
    start = time.perf_counter()
    requests = [Request(p, n, on_done=finished.append) for p, n in zip(prompts, replies)]
    for r in requests:
        scheduler.submit(r)
    last = start
    while len(finished) < len(requests):
        time.sleep(0.05)
        if time.perf_counter() - last >= every:
            last = time.perf_counter()
            done_tokens = sum(len(r.generated) for r in requests)
            say(f"{label}: {len(finished)}/{len(requests)} prompts, {done_tokens} new tokens, "
                f"{done_tokens / (last - start):.0f} tokens/s")
    seconds = time.perf_counter() - start
    for r in requests:
        if r.error is not None:
            raise r.error
    tokens = sum(len(r.generated) for r in requests)
    assert tokens == sum(replies), (tokens, sum(replies))
    return {"prompts": len(prompts), "new_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}, [list(r.generated) for r in requests]


def same_replies(ours, reference) -> dict:
    """How many replies are token for token those of the reference run (same prompts, greedy)."""
    identical = sum(a == b for a, b in zip(ours, reference))
    return {"replies_identical_to_default": identical, "replies": len(reference)}


def bs1_scheduler(scheduler, prompt, new_tokens):
    r = scheduler.submit(Request(list(prompt), new_tokens))
    r.result()
    decode_s = r.finished_at - r.first_token_at
    return {"prompt_tokens": len(prompt), "new_tokens": len(r.generated),
            "ttft_s": round(r.first_token_at - r.submitted_at, 4),
            "decode_tokens_per_s": round((len(r.generated) - 1) / decode_s, 1)}, r.generated


def profile_bs1(scheduler, prompt, new_tokens, device):
    """torch.profiler over one batch-1 request: how much of the decode wall time the GPU is busy, and the
    kernels (CUDA graph replays included) that take that time, as a table in the log and a summary."""
    with device_profile(device == "cuda") as kernels:
        a, _ = bs1_scheduler(scheduler, prompt, new_tokens)
    n = max(a["new_tokens"], 1)
    wall_us = a["new_tokens"] / a["decode_tokens_per_s"] * 1e6 if a["decode_tokens_per_s"] else 0
    say(f"profile, batch 1, {a['new_tokens']} new tokens: {a['decode_tokens_per_s']} tokens/s; GPU busy "
        f"{kernels.busy_us / n / 1000:.2f} ms per token of {wall_us / n / 1000:.2f} ms")
    top = kernels.top(25)
    for row in top:
        say(f"  {row['device_ms']:9.2f} ms {row['device_ms'] * 1000 / max(kernels.busy_us, 1):6.1%} "
            f"x{row['calls']:<6} {row['name']}")
    return {"decode_tokens_per_s": a["decode_tokens_per_s"], "new_tokens": a["new_tokens"],
            "gpu_busy_ms_per_token": round(kernels.busy_us / n / 1000, 3),
            "wall_ms_per_token": round(wall_us / n / 1000, 3), "top_kernels": top}


def profile_batched(scheduler, prompts, replies, device) -> dict:
    """torch.profiler over a batched run (the scheduler's continuous batching): wall time, GPU busy time, the
    device time by kind of kernel, the longest kernels, and the scheduler's steps and forwards in the run."""
    before = dict(scheduler.stats)
    with device_profile(device == "cuda") as kernels:
        b, _ = run_scheduler(scheduler, prompts, replies, "(b) profiled")
    steps = {k: scheduler.stats[k] - before.get(k, 0) for k in scheduler.stats}
    kinds = {k: round(v / 1000, 1) for k, v in sorted(kernels.by_kind().items(), key=lambda kv: -kv[1])}
    say(f"profile, batched, {len(prompts)} prompts: {b['tokens_per_s']} new tokens/s under the profiler; GPU busy "
        f"{kernels.busy_us / 1e6:.2f} s of {b['seconds']} s wall; {steps['decode_steps']} decode steps "
        f"({steps['decode_tokens'] / max(steps['decode_steps'], 1):.1f} rows each), {steps['prefill_forwards']} "
        f"prefill forwards ({steps['prefill_tokens'] / max(steps['prefill_forwards'], 1):.0f} tokens each); "
        f"device ms by kind: {kinds}")
    top = kernels.top(25)
    for row in top:
        say(f"  {row['device_ms']:9.2f} ms {row['device_ms'] * 1000 / max(kernels.busy_us, 1):6.1%} "
            f"x{row['calls']:<6} {row['name']}")
    return {**b, "gpu_busy_s": round(kernels.busy_us / 1e6, 2), "scheduler_stats": steps,
            "device_ms_by_kind": kinds, "top_kernels": top}


def bs1_with(scheduler, prompt, new_tokens, **settings):
    """Batch 1 with scheduler attributes changed for the measurement, then put back: an 8-token request
    first (a new shape compiles or captures there), then the measured one. (result, tokens); the result
    has `compile_and_capture_s`, the seconds of both."""
    saved = {name: getattr(scheduler, name) for name in settings}
    for name, value in settings.items():
        setattr(scheduler, name, value)
    try:
        start = time.perf_counter()
        bs1_scheduler(scheduler, prompt, 8)
        r, tokens = bs1_scheduler(scheduler, prompt, new_tokens)
    finally:
        for name, value in saved.items():
            setattr(scheduler, name, value)
    r["compile_and_capture_s"] = round(time.perf_counter() - start, 1)
    return r, tokens


def bs1_one_row_options(scheduler, prompt, new_tokens, reference, option_sets, measured: list, save) -> None:
    """Batch 1 with the one-row decode step recompiled under each inductor option set, then under the
    default's again (the drift of the machine over the measurements). Appends one dict per measurement to
    `measured`: the options, tokens/s, the seconds of its compilation and captures, whether its tokens are
    the default's."""
    from zhtune.infer import batching
    default = dict(batching.ONE_ROW_OPTIONS)
    try:
        for options in [*option_sets, default]:
            batching.ONE_ROW_OPTIONS = options
            scheduler.discard_compiled()
            r, tokens = bs1_with(scheduler, prompt, new_tokens)
            r.update(options=options, tokens_identical_to_default=tokens == reference)
            measured.append(r)
            say(f"(a) batch 1, one-row step under {json.dumps(options)}: {r['decode_tokens_per_s']} tokens/s "
                f"(compilation and captures {r['compile_and_capture_s']}s; same tokens: "
                f"{r['tokens_identical_to_default']})")
            save()
    finally:
        batching.ONE_ROW_OPTIONS = default


def bs1_weight_fusion(scheduler, model, prompt, new_tokens, reference) -> dict:
    """Batch 1 again with the model's projections fused otherwise than by default (zhtune/infer/
    fused_weights.py): none, gate/up only, gate/up and q/k/v (each recompiles and recaptures). For each
    state other than the scheduler's own: tokens/s, the compilation and captures it costs, and whether its
    tokens are those of the default run. The model is left as the last state measured."""
    from zhtune.infer.fused_weights import fuse_gate_up, fuse_qkv, unfuse_gate_up, unfuse_qkv
    states = {"unfused": (), "gate_up": (fuse_gate_up,), "gate_up_qkv": (fuse_gate_up, fuse_qkv)}
    current = "gate_up_qkv" if scheduler.fused_layers else "unfused"
    measured = {}
    for name, fuses in states.items():
        if name == current:
            continue

        def refuse(fuses=fuses):
            unfuse_qkv(model)
            unfuse_gate_up(model)
            return [fuse(model) for fuse in fuses]
        fused = scheduler.run_exclusive(refuse)
        scheduler.discard_compiled()
        r, tokens = bs1_with(scheduler, prompt, new_tokens)
        r["blocks_fused"] = fused
        r["tokens_identical_to_default"] = tokens == reference
        r["first_difference"] = next((i for i, (x, y) in enumerate(zip(tokens, reference)) if x != y), None)
        measured[name] = r
        say(f"(a) batch 1 with {name.replace('_', ' + ').replace('gate + up', 'gate/up')} "
            f"({'blocks fused per kind: ' + str(fused) if fused else 'no weights fused'}): "
            f"{r['decode_tokens_per_s']} tokens/s (compilation and captures {r['compile_and_capture_s']}s); "
            f"tokens identical to the default's ({current}): {r['tokens_identical_to_default']}")
    return measured


# -- transformers' generate ---------------------------------------------------------------------------

def hf_generate(model, device, batch, max_new_tokens):
    width = max(len(p) for p in batch)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, temperature=None, top_k=None, top_p=None, eos_token_id=None,
                             pad_token_id=0)
    return out[:, width:].tolist()


def bs1_hf(model, device, prompt, new_tokens):
    hf_generate(model, device, [prompt[:8]], 2)  # warm
    sync(device)
    start = time.perf_counter()
    hf_generate(model, device, [prompt], 1)
    sync(device)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    hf_generate(model, device, [prompt], new_tokens)
    sync(device)
    total = time.perf_counter() - start
    return {"new_tokens": new_tokens, "ttft_s": round(ttft, 4),
            "decode_tokens_per_s": round((new_tokens - 1) / max(total - ttft, 1e-9), 1)}


def run_hf_batched(model, device, prompts, replies, batch_size, every: float = 10.0):
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    start = last = time.perf_counter()
    useful = generated = 0
    for k, batch in enumerate(batches, 1):
        longest = max(replies[i] for i in batch)
        hf_generate(model, device, [prompts[i] for i in batch], longest)
        useful += sum(replies[i] for i in batch)
        generated += longest * len(batch)
        if time.perf_counter() - last >= every or k == len(batches):
            last = time.perf_counter()
            say(f"hf generate: batch {k}/{len(batches)}, {useful} new tokens, {useful / (last - start):.0f} tokens/s")
    sync(device)
    seconds = time.perf_counter() - start
    return {"prompts": len(prompts), "new_tokens": useful, "tokens_computed": generated,
            "seconds": round(seconds, 2), "tokens_per_s": round(useful / seconds, 1)}


# -- vllm on the same workloads ---------------------------------------------------------------------------

def run_vllm(profile: dict, n_prompts: int, batch_size: int, out: Path) -> int:
    """vllm (where staged) on workloads (a) and (b): the same config with random ("dummy") weights, the
    same prompt ids and drawn reply lengths, at most `batch_size` sequences at a time (the scheduler's
    slots), vllm's defaults otherwise (its compiled model and CUDA graphs). Its own JSON: vllm_* keys."""
    import tempfile

    from transformers import Gemma2Config
    try:
        import vllm
        from vllm import LLM, SamplingParams
    except ImportError:
        say("--engine vllm needs vllm (scripts/stage_vllm.sh stages it on the GPU machine)")
        return 2
    t0 = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="gemma2-9b-config-"))
    config = Gemma2Config(**GEMMA2_9B)
    config.architectures = ["Gemma2ForCausalLM"]
    config.save_pretrained(folder)
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(), "engine": "vllm",
               "model": "Gemma-2-9B config, random (dummy) weights, bf16, vllm's attention with softcap",
               "versions": {"vllm": vllm.__version__, "torch": torch.__version__}, "batch_size": batch_size,
               "vllm_bs1_decode_tokens_per_s": None, "vllm_bs1_ttft_s": None, "vllm_batched_tokens_per_s": None}

    def save():
        results["seconds_total"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    say(f"vllm {vllm.__version__}: loading the Gemma-2-9B config with dummy weights (compiles and captures)")
    llm = LLM(model=str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", seed=0,
              max_model_len=profile["hi"] + profile["cap"] + 64, max_num_seqs=batch_size,
              gpu_memory_utilization=0.85)
    results["load_s"] = round(time.perf_counter() - t0, 1)
    say(f"vllm ready in {results['load_s']}s")
    vocab = GEMMA2_9B["vocab_size"]

    def generate(prompts, lengths):
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False) for n in lengths]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    bs1_prompt, _ = draw_bs1_prompt(profile, vocab)  # the same batch-1 prompt as the scheduler's run
    generate([bs1_prompt], [8])  # warm
    start = time.perf_counter()
    generate([bs1_prompt], [1])
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    made = generate([bs1_prompt], [profile["bs1_new"]])[0]
    total = time.perf_counter() - start
    results["vllm_bs1_ttft_s"] = round(ttft, 4)
    results["vllm_bs1_decode_tokens_per_s"] = round((made - 1) / max(total - ttft, 1e-9), 1)
    say(f"(a) vllm batch 1: {results['vllm_bs1_decode_tokens_per_s']} tokens/s, TTFT {ttft * 1000:.0f} ms")
    save()
    prompts, replies = draw_workload(n_prompts, vocab, profile["lo"], profile["hi"], profile["cap"])
    start = time.perf_counter()
    made = sum(generate(prompts, replies))
    seconds = time.perf_counter() - start
    assert made == sum(replies), (made, sum(replies))
    results["vllm_batched"] = {"prompts": n_prompts, "new_tokens": made, "seconds": round(seconds, 2),
                               "tokens_per_s": round(made / seconds, 1)}
    results["vllm_batched_tokens_per_s"] = results["vllm_batched"]["tokens_per_s"]
    say(f"(b) vllm, {n_prompts} prompts, at most {batch_size} at a time: {results['vllm_batched_tokens_per_s']} "
        f"new tokens/s ({seconds:.1f}s)")
    save()
    say(f"wrote {out} ({results['seconds_total']}s in all)")
    return 0


# -- main -----------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny Gemma 2 on the CPU (seconds)")
    ap.add_argument("--quick", action="store_true", help="smaller workloads: < 8 minutes on an H200")
    ap.add_argument("--batch_size", type=int, default=None, help="scheduler slots = HF batch size (default 32; tiny 8)")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--hf_prompts", type=int, default=None, help="prompts for the HF baseline and the speedup")
    ap.add_argument("--compile", default=None, help="torch.compile mode of the decode step (default: graphs "
                    "on CUDA, none on the CPU); 0 for none")
    ap.add_argument("--skip", nargs="*", default=[], choices=["bs1", "match", "batched", "hf"])
    ap.add_argument("--engine", choices=["pt", "vllm"], default="pt",
                    help="pt: zhtune's scheduler against HF generate (default); vllm: vllm on the same workloads")
    ap.add_argument("--profile", action="store_true", help="also profile batch-1 decoding (torch.profiler): "
                    "GPU busy share of the wall time and the kernels that take it")
    ap.add_argument("--batched_single_reads", action="store_true", help="also the batched workload with one "
                    "host read per decode step while requests wait for a slot (the previous default)")
    ap.add_argument("--other_prefill", action="store_true", help="also the batched workload with the prefill "
                    "the other way: eager where it compiles by default (CUDA graphs), compiled where it runs eager")
    ap.add_argument("--profile_batched", type=int, default=0, metavar="N",
                    help="also profile a batched run of the workload's first N prompts (torch.profiler), last")
    ap.add_argument("--weight_fusion", action="store_true", help="also batch 1 with the weights fused "
                    "otherwise than by default: none, gate/up only, gate/up + q/k/v (zhtune/infer/fused_weights.py; "
                    "each recompiles and recaptures), last")
    ap.add_argument("--unfused", action="store_true", help="the scheduler without its default weight fusion "
                    "(gate/up and q/k/v read as one weight each on a GPU)")
    ap.add_argument("--one_row_options", nargs="*", default=[], metavar="JSON",
                    help="also batch 1 with the one-row step recompiled under each of these inductor option sets "
                    "(JSON objects, e.g. '{\"max_autotune\": true}'), then the default's again, last")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    setup_logging()  # the scheduler's own lines: compilation heartbeat, captures
    profile = PROFILES["tiny" if args.tiny else "quick" if args.quick else "full"]
    n_prompts = args.prompts or profile["prompts"]
    n_hf = min(args.hf_prompts or profile["hf_prompts"], n_prompts)
    batch_size = args.batch_size or (8 if args.tiny else 32)
    if not args.tiny and not torch.cuda.is_available():
        say("no CUDA GPU: use --tiny on the CPU")
        return 2
    t0 = time.perf_counter()
    suffix = ("-tiny" if args.tiny else "-quick" if args.quick else "") + ("-vllm" if args.engine == "vllm" else "")
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"{time.strftime('%Y-%m-%d')}-infer-speed{suffix}.json")
    if args.engine == "vllm":
        if args.tiny:
            say("--engine vllm runs the Gemma-2-9B config on a GPU; --tiny is for the pt engine on the CPU")
            return 2
        return run_vllm(profile, n_prompts, batch_size, out)
    model, device = build_model(args.tiny)
    wbytes = weight_bytes(model)
    import transformers
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "model": "tiny Gemma 2 (random)" if args.tiny else "Gemma-2-9B config, random weights, bf16, eager "
               "attention with softcap", "profile": "tiny" if args.tiny else "quick" if args.quick else "full",
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "batch_size": batch_size, "weight_bytes": wbytes,
               "bs1_bandwidth_limit_tokens_per_s": round(HBM_BYTES_PER_S / wbytes, 1),
               "bs1_decode_tokens_per_s": None, "bs1_ttft_s": None, "batched_tokens_per_s": None,
               "hf_generate_batched_tokens_per_s": None, "batched_speedup_vs_hf": None}

    def save():
        results["seconds_total"] = round(time.perf_counter() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    say(f"{results['device']}: {results['model']}, {wbytes / 1e9:.2f} GB of weights -> batch-1 limit "
        f"{results['bs1_bandwidth_limit_tokens_per_s']} tokens/s at 4.8 TB/s; built in {time.perf_counter() - t0:.0f}s")
    prompts, replies = draw_workload(n_prompts, model.config.vocab_size, profile["lo"], profile["hi"], profile["cap"])
    say(f"workload (b): {n_prompts} prompts of {min(map(len, prompts))}..{max(map(len, prompts))} tokens "
        f"(mean {sum(map(len, prompts)) / n_prompts:.0f}), replies of {min(replies)}..{max(replies)} tokens "
        f"(mean {sum(replies) / n_prompts:.0f}); HF baseline on the first {n_hf}")
    length = profile["hi"] + profile["cap"]
    vocab = model.config.vocab_size
    bs1_prompt, rng = draw_bs1_prompt(profile, vocab)  # rng goes on to draw the exactness prompts
    n_match, n_tokens = profile["match"]
    match_prompts = [[rng.randrange(3, vocab) for _ in range(16 + 24 * i)] for i in range(n_match)]

    # the baseline first, on the model as transformers builds it (the scheduler then fuses its weights)
    if "hf" not in args.skip:
        if "bs1" not in args.skip:
            h = bs1_hf(model, device, bs1_prompt, profile["hf_bs1_new"])
            results["hf_generate_bs1"] = h
            results["hf_generate_bs1_decode_tokens_per_s"] = h["decode_tokens_per_s"]
            say(f"(a) HF generate batch 1: {h['decode_tokens_per_s']} tokens/s, TTFT {h['ttft_s'] * 1000:.0f} ms")
        hf = run_hf_batched(model, device, prompts[:n_hf], replies[:n_hf], batch_size)
        results["hf_generate_batched"] = hf
        results["hf_generate_batched_tokens_per_s"] = hf["tokens_per_s"]
        say(f"(b) HF generate batch {batch_size}, {n_hf} prompts: {hf['tokens_per_s']} new tokens/s "
            f"({hf['tokens_computed']} computed for {hf['new_tokens']} wanted)")
        save()
    if "match" not in args.skip:
        match_refs = [hf_generate(model, device, [p], n_tokens)[0] for p in match_prompts]

    scheduler = Scheduler(model, max_slots=batch_size, max_len=model.config.max_position_embeddings,
                          compile=args.compile, fuse_weights=not args.unfused)
    results["compile"] = scheduler.compile_mode
    results["fused_blocks"] = scheduler.fused_layers
    say(f"warm-up: cache {batch_size} slots x {length} tokens, compiling the decode step "
        f"({scheduler.compile_mode or 'no compilation'}) for every rows x keys bucket; "
        f"{scheduler.fused_layers} blocks of weights fused")
    rows = sorted({min(1 << k, batch_size) for k in range(batch_size.bit_length() + 1)})
    results["warm_up_s"] = round(scheduler.warm_up(rows=rows, slots=batch_size, length=length, all_lengths=True), 1)
    results["compiled"] = scheduler._compiled is not None and scheduler._decode is not scheduler._forward_decode
    say(f"warm-up done in {results['warm_up_s']}s (compiled: {results['compiled']})")
    save()

    # (a) batch 1
    if "bs1" not in args.skip:
        bs1_scheduler(scheduler, bs1_prompt, 8)  # warm the exact shapes
        a, bs1_tokens = bs1_scheduler(scheduler, bs1_prompt, profile["bs1_new"])
        results["bs1"] = a
        results["bs1_decode_tokens_per_s"], results["bs1_ttft_s"] = a["decode_tokens_per_s"], a["ttft_s"]
        results["bs1_share_of_limit"] = round(a["decode_tokens_per_s"] / results["bs1_bandwidth_limit_tokens_per_s"], 3)
        say(f"(a) batch 1, prompt {len(bs1_prompt)} + {a['new_tokens']} new: {a['decode_tokens_per_s']} tokens/s "
            f"({results['bs1_share_of_limit']:.0%} of the limit), TTFT {a['ttft_s'] * 1000:.0f} ms "
            f"(greedy runs of {scheduler.greedy_run} steps per host read)")
        single, _ = bs1_with(scheduler, bs1_prompt, profile["bs1_new"], greedy_run=1)  # a host read per token
        results["bs1_one_step_per_read"] = single
        say(f"(a) batch 1, one host read per step: {single['decode_tokens_per_s']} tokens/s")
        save()

    # exactness: first tokens of 8 fixed prompts, scheduler batch 1 vs HF generate batch 1 (stock model)
    if "match" not in args.skip:
        identical, first_diff = 0, []
        for p, ref in zip(match_prompts, match_refs):
            _, ours = bs1_scheduler(scheduler, p, n_tokens)
            same = ours == ref
            identical += same
            first_diff.append(None if same else next(i for i, (x, y) in enumerate(zip(ours, ref)) if x != y))
        results["greedy_match"] = {"prompts": n_match, "tokens": n_tokens, "identical": identical,
                                   "first_difference": first_diff}
        say(f"greedy match vs HF generate: {identical}/{n_match} prompts identical over {n_tokens} tokens "
            f"(first differences: {first_diff})")
        save()

    # (b) batched
    if "batched" not in args.skip:
        b, b_tokens = run_scheduler(scheduler, prompts, replies, "(b) scheduler")
        results["batched"] = b
        results["batched_tokens_per_s"] = b["tokens_per_s"]
        say(f"(b) scheduler, {n_prompts} prompts: {b['tokens_per_s']} new tokens/s ({b['seconds']}s; prefill "
            f"{'compiled' if scheduler.compile_prefill else 'eager'})")
        save()
        if args.batched_single_reads:  # the previous default, same run: one host read per step while requests wait
            saved = scheduler.greedy_run_waiting
            scheduler.greedy_run_waiting = 1
            try:
                single, tokens = run_scheduler(scheduler, prompts, replies, "(b) one read per step while requests wait")
            finally:
                scheduler.greedy_run_waiting = saved
            same = same_replies(tokens, b_tokens)
            results["batched_one_read_per_step_while_waiting"] = {**single, **same}
            say(f"(b) scheduler, one host read per step while requests wait: {single['tokens_per_s']} new tokens/s "
                f"against {b['tokens_per_s']} with runs of up to {saved} steps; "
                f"{same['replies_identical_to_default']}/{n_prompts} replies identical")
            save()
        if args.other_prefill:  # the prefill the other way, same run, then back
            default = scheduler.compile_prefill
            scheduler.compile_prefill = not default
            try:
                warm = scheduler.warm_up_prefill()
                other, tokens = run_scheduler(scheduler, prompts, replies, "(b) other prefill")
                compiled = scheduler.compile_prefill and scheduler._prefill_compiled_once  # False: fell back
            finally:
                scheduler.compile_prefill = default
            key = "batched_eager_prefill" if default else "batched_compiled_prefill"
            results[key] = {**other, "compile_s": round(warm, 1), "compiled": compiled, **same_replies(tokens, b_tokens)}
            say(f"(b) scheduler with the prefill {'eager' if default else 'compiled'} (the default: "
                f"{'compiled' if default else 'eager'}): {other['tokens_per_s']} new tokens/s against "
                f"{b['tokens_per_s']}; {results[key]['replies_identical_to_default']}/{n_prompts} replies identical")
            save()
    if "hf" not in args.skip:
        sub, _ = run_scheduler(scheduler, prompts[:n_hf], replies[:n_hf], "(b) scheduler, HF's prompts")
        results["batched_same_prompts_as_hf"] = sub
        results["batched_speedup_vs_hf"] = round(sub["tokens_per_s"] / results["hf_generate_batched_tokens_per_s"], 2)
        say(f"(b) scheduler on the {n_hf} prompts of the baseline: {sub['tokens_per_s']} new tokens/s; speedup "
            f"{results['batched_speedup_vs_hf']}x over HF generate")
    results["scheduler_stats"] = dict(scheduler.stats)
    save()
    # last, so that a failure here costs nothing above: the profile, and batch 1 decoded as 1 row
    if "bs1" not in args.skip and args.profile:
        try:
            results["bs1_profile"] = profile_bs1(scheduler, bs1_prompt, 64, device)
        except Exception as e:  # noqa: BLE001 - a measurement of its own; the numbers above stand
            results["bs1_profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"profile failed: {results['bs1_profile']['error']}")
        save()
    if "bs1" not in args.skip and scheduler.one_row_autotune:  # the other way: 2 rows through the dynamic step
        two_rows, two_tokens = bs1_with(scheduler, bs1_prompt, profile["bs1_new"], min_rows=2)
        two_rows["tokens_identical_to_one_row"] = two_tokens == bs1_tokens
        results["bs1_two_rows"] = two_rows
        say(f"(a) batch 1 decoded as 2 rows (the dynamic step, no autotuning; the default before): "
            f"{two_rows['decode_tokens_per_s']} tokens/s against {results['bs1_decode_tokens_per_s']} as one "
            f"autotuned row; same tokens: {two_rows['tokens_identical_to_one_row']}")
        save()
    elif "bs1" not in args.skip and scheduler.min_rows > 1:  # a GEMV instead of min_rows rows; one more compilation
        rows = scheduler.min_rows
        one_row, _ = bs1_with(scheduler, bs1_prompt, profile["bs1_new"], min_rows=1)
        results["bs1_one_row"] = one_row
        say(f"(a) batch 1 decoded as 1 row instead of {rows}: {one_row['decode_tokens_per_s']} tokens/s "
            f"(its compilation and captures {one_row['compile_and_capture_s']}s)")
        save()
    if args.profile_batched:
        n = min(args.profile_batched, n_prompts)
        try:
            results["batched_profile"] = profile_batched(scheduler, prompts[:n], replies[:n], device)
        except Exception as e:  # noqa: BLE001 - a measurement of its own; the numbers above stand
            results["batched_profile"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            say(f"batched profile failed: {results['batched_profile']['error']}")
        save()
    if "bs1" not in args.skip and args.one_row_options:  # (no one-row step without CUDA graphs: the same step)
        results["bs1_one_row_options"] = []  # filled (and saved) measurement by measurement
        bs1_one_row_options(scheduler, bs1_prompt, profile["bs1_new"], bs1_tokens,
                            [json.loads(o) for o in args.one_row_options], results["bs1_one_row_options"], save)
    if "bs1" not in args.skip and args.weight_fusion:
        results["bs1_weight_fusion"] = bs1_weight_fusion(scheduler, model, bs1_prompt, profile["bs1_new"], bs1_tokens)
        save()
    say("summary")
    for key in ("device", "bs1_decode_tokens_per_s", "bs1_ttft_s", "bs1_bandwidth_limit_tokens_per_s",
                "batched_tokens_per_s", "hf_generate_batched_tokens_per_s", "batched_speedup_vs_hf", "greedy_match"):
        say(f"  {key}: {results.get(key)}")
    say(f"wrote {out} ({results['seconds_total']}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
