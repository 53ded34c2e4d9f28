"""Speed, memory and exactness of `zhtune sft`'s training step on Gemma-2-9B: the plain transformers +
PEFT eager baseline beside the fast path, on identical data, in one run.

    python benchmarks/sft_speed.py                      # one GPU: baseline + every fast-path variant
    torchrun --nproc_per_node 4 benchmarks/sft_speed.py --variants chunked_nocast  # DDP scaling
    python benchmarks/sft_speed.py --smoke              # tiny Gemma 2 on the CPU, seconds

Model: the real Gemma-2-9B config (below), random weights made on the GPU in bf16. The seed's LoRA
settings: r=8, alpha=32, dropout 0.05 on every nn.Linear of the decoder, on embed_tokens and on the
(tied) lm_head; every Gemma2RMSNorm trained. The norms are trained by setting their weights'
requires_grad, not through PEFT's modules_to_save (which would copy each of the 169 norms and wrap
it; the gradients are the same). lora_B starts from N(0, 0.02) instead of zeros, as after some
training, so that every LoRA matrix gets a non-zero gradient for the agreement check.

Data: samples whose (tokens, trained tokens) are those of the 1000 rows of alpaca_zh_demo under the
Gemma tokenizer and chat template (benchmarks/alpaca_zh_lengths.json; mean 142 tokens), plus 40 long
samples of 1024..8192 tokens (log-uniform, half trained), random token ids. They are packed
(best-fit decreasing) into rows of --max_length, and --packs rows are drawn: the baseline trains on
their samples one by one (the seed's batch_size 1; --baseline_batch_size pads several), the fast path
on the packed rows. Tokens/s counts real tokens only (never padding).

Variants (each adds one lever, and is timed after a warm-up step; results in benchmarks/RESULTS.md):
    baseline        eager attention, per-sample batches, full logits, transformers' loss, all layers checkpointed
    packed_full     packing + flex_attention (softcap score_mod, document masks), full logits + transformers' loss
    chunked         + chunked softcapped loss (no full logits; lm_head only on trained tokens)
    chunked_nocast  + PEFT's LoRA inputs left in bf16 (no fp32 copy; bf16 autocast does the matmul either way)
    mem_lean        chunked_nocast with loss chunks of 256 tokens instead of 1024 (less memory for the logits)
    ckpt_auto       chunked_nocast + only as many layers checkpointed as --mem_budget_gib needs (measured)
    compiled_all    chunked_nocast + torch.compile of each decoder layer (regional), every layer checkpointed
    compiled        compiled_all + only as many layers checkpointed as --mem_budget_gib needs (planned compiled)
    compiled_nockpt compiled_all with no layer checkpointed (no recomputation; needs ~90 GiB: an H200, not an H100)
All run under bf16 autocast, as transformers' Trainer does with bf16=True. The optimizer step (AdamW
on ~32M LoRA parameters, a few ms) is outside the timed region for every variant alike.

FLOPs per token (model FLOPs, recomputation not counted), for utilisation against 989 TFLOP/s:
    linear: 2 * (L * (H*(Q + 2*KV) + Q*H + 3*H*I) + H*V) per token forward, with Q = heads*head_dim,
            KV = kv_heads*head_dim; training with frozen base weights = forward + input gradients = 2x.
    attention: 4 * heads * head_dim * (keys attended) per token per layer forward (QK^T and PV),
            keys attended = position in its own sample + 1, at most sliding_window on sliding layers;
            training = 3x forward (backward computes dQ, dK, dV).
    LoRA and norm FLOPs (< 1%) are left out. For Gemma-2-9B the linear term is 36.9 GFLOP/token.
"""

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zhtune.log import setup_logging  # noqa: E402
from zhtune.train.fast_path import (FastPath, compile_decoder_layers, set_checkpointed_layers,  # noqa: E402
                                    set_lora_input_casting)
from zhtune.train.packing import IGNORE_INDEX, PackedCollator, PaddedCollator, pack_encoded  # noqa: E402

GEMMA2_9B = dict(  # google/gemma-2-9b config.json
    architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000, hidden_size=3584,
    intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8,
    head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
    rope_theta=10000.0, attention_bias=False, attention_dropout=0.0, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=256,
    tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=1,
)
SMOKE = dict(GEMMA2_9B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32, query_pre_attn_scalar=16)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"]
VARIANTS = ["baseline", "packed_full", "chunked", "chunked_nocast", "mem_lean", "ckpt_auto", "compiled_all", "compiled",
            "compiled_nockpt"]
H100_BF16_PEAK = 989e12
LENGTHS = Path(__file__).resolve().parent / "alpaca_zh_lengths.json"


# -- model -----------------------------------------------------------------------------------------

def build_model(config: dict, device: str, dtype, attn: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(**config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS)
    model = get_peft_model(model, lora)
    gen = torch.Generator(device=device).manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_A" in name:  # the zero-initialised halves
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 0.02)
        if "norm" in name and "lora" not in name:
            p.requires_grad_(True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def set_attention(model, attn: str):
    model.get_base_model().config._attn_implementation = attn


def set_dropout(model, p: float) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def trainable_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() if p.grad is not None else torch.zeros(p.numel(),
                      device=p.device) for p in model.parameters() if p.requires_grad])


# -- data ------------------------------------------------------------------------------------------

def make_samples(vocab: int, max_length: int, seed: int = 0, scale: float = 1.0, n_long: int = 40) -> list[dict]:
    """The training mix: alpaca_zh lengths plus long samples, random token ids."""
    rng = random.Random(seed)
    shapes = json.loads(LENGTHS.read_text())["samples"]
    shapes = [(max(2, int(n * scale)), max(1, int(t * scale))) for n, t in shapes]
    lo, hi = math.log(max_length / 8), math.log(max_length)
    for _ in range(n_long):
        n = int(math.exp(rng.uniform(lo, hi)))
        shapes.append((n, n // 2))
    samples = []
    for n, trained in shapes:
        n = min(n, max_length)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = n - min(trained, n - 1)
        samples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return samples


def split_row(row: dict) -> list[dict]:
    """A packed row back into its samples (for the per-sample baseline on the same tokens)."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [{"input_ids": row["input_ids"][a:b], "labels": [IGNORE_INDEX] + row["labels"][a + 1:b]}
            for a, b in zip(starts, starts[1:])]


def trained_count(labels) -> int:
    return sum(1 for x in labels[1:] if x != IGNORE_INDEX)


# -- FLOPs -----------------------------------------------------------------------------------------

def model_flops(cfg: dict, docs: list[int]) -> float:
    """Training model FLOPs for samples of these lengths (see the module docstring)."""
    H, I, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    Q, KV = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    linear = 2 * (L * (H * (Q + 2 * KV) + Q * H + 3 * H * I) + H * V)
    tokens = sum(docs)
    window = cfg.get("sliding_window") or 10**9
    keys_full = sum(n * (n + 1) / 2 for n in docs)
    keys_sliding = sum(_keys_sliding(n, window) for n in docs)
    n_sliding = L // 2  # Gemma 2 alternates sliding and full layers
    attn = 4 * Q * (keys_full * (L - n_sliding) + keys_sliding * n_sliding)
    return 2 * linear * tokens + 3 * attn


def _keys_sliding(n: int, w: int) -> float:
    m = min(n, w)
    return m * (m + 1) / 2 + (n - m) * w


# -- steps -----------------------------------------------------------------------------------------

def baseline_step(model, batch, num_items=None):
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                use_cache=False, **kwargs)
    out.loss.backward()
    return out.loss.detach()


def packed_full_step(model, batch, num_items=None):
    kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                use_cache=False, **kwargs)
    out.loss.backward()
    return out.loss.detach()


def make_chunked_step(fast: FastPath):
    def step(model, batch, num_items=None):
        loss = fast.compute_loss(model, batch, num_items_in_batch=num_items)
        loss.backward()
        return loss.detach()
    return step


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Timer:
    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else float("nan")


def run_steps(model, step, batches, device, autocast, timer: Timer, warmup: int = 1):
    """(seconds for the timed batches, peak GiB over warm-up and timed steps)."""
    timer.reset_peak()
    for batch in batches[:warmup]:
        with autocast():
            step(model, to_device(batch, device))
        model.zero_grad(set_to_none=True)
    timer.sync()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        with autocast():
            step(model, to_device(batch, device))
        model.zero_grad(set_to_none=True)
    timer.sync()
    return time.perf_counter() - start, timer.peak_gib()


# -- the run ---------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny Gemma 2 on the CPU")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--max_length", type=int, default=8192)
    ap.add_argument("--packs", type=int, default=4, help="packed rows of data (per process)")
    ap.add_argument("--repeat", type=int, default=2, help="timed passes over the fast path's rows")
    ap.add_argument("--baseline_batch_size", type=int, default=1)
    ap.add_argument("--chunk_size", type=int, default=1024)
    ap.add_argument("--mem_budget_gib", type=float, default=70.0, help="ckpt_auto's memory budget")
    ap.add_argument("--time_budget_s", type=float, default=400.0, help="skip variants that would start later")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    setup_logging()

    world, rank, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")), \
        int(os.environ.get("LOCAL_RANK", "0"))
    t0 = time.perf_counter()
    if args.smoke:
        device, dtype, attn_fast, config = "cpu", torch.float32, "eager", dict(SMOKE)
        args.max_length = min(args.max_length, 256)
        args.packs, args.repeat = min(args.packs, 2), 1
    else:
        device, dtype, attn_fast, config = f"cuda:{local}", torch.bfloat16, "flex_attention", dict(GEMMA2_9B)
        torch.cuda.set_device(local)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    cuda = device.startswith("cuda")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else \
        (lambda: torch.autocast("cpu", enabled=False))
    variants = [v for v in args.variants.split(",") if v]
    if args.smoke and args.variants == ",".join(VARIANTS):
        variants = [v for v in variants if not v.startswith("compiled")]  # inductor on a CPU: minutes
    timer = Timer(device)
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(local) if cuda else "cpu",
               "world_size": world, "versions": _versions(), "args": vars(args), "variants": {}}
    say(f"[bench] {results['device']} x{world}, {results['versions']}")

    torch.manual_seed(0)
    model = build_model(config, device, dtype, attn_fast)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"[bench] model built in {time.perf_counter() - t0:.1f}s; trainable {trainable / 1e6:.1f}M; "
        f"GPU memory {torch.cuda.memory_allocated() / 2**30 if cuda else 0:.1f} GiB")

    scale = 1.0 if not args.smoke else 0.25
    pool = make_samples(config["vocab_size"], args.max_length, seed=0, scale=scale,
                        n_long=40 if not args.smoke else 6)
    rows = pack_encoded(pool, args.max_length, seed=0)
    rows = rows[rank * args.packs:(rank + 1) * args.packs]
    if len(rows) < args.packs:
        raise SystemExit(f"only {len(rows)} packed rows for rank {rank}; lower --packs")
    docs = [d for r in rows for d in split_row(r)]
    doc_lengths = [len(d["input_ids"]) for d in docs]
    tokens = sum(doc_lengths)
    flops = model_flops(config, doc_lengths)
    packed = PackedCollator(pad_id=0, pad_to_multiple_of=args.max_length)
    fast_batches = [packed([r]) for r in rows]
    padded = PaddedCollator(pad_id=0)
    b = args.baseline_batch_size
    base_batches = [padded(docs[i:i + b]) for i in range(0, len(docs), b)]
    say(f"[bench] data: {len(docs)} samples, {tokens} tokens ({tokens / len(rows) / args.max_length:.1%} of "
        f"{len(rows)} rows of {args.max_length}), longest {max(doc_lengths)}, "
        f"{flops / tokens / 1e9:.1f} GFLOP/token (model FLOPs, training)")
    fast = FastPath(chunk_size=args.chunk_size)  # its one line goes to the zhtune logger (stderr)

    class _Args:
        fast_path, packing, deepspeed = (True if args.smoke else None), True, None
    fast.decide(model.get_base_model().config, device, _Args())

    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(model, device_ids=[local] if cuda else None, find_unused_parameters=False)

    # -- agreement: the same first row, baseline (per sample, eager) vs fast (packed, flex, chunked)
    if world == 1 and "baseline" in variants:
        results["agreement"] = agreement(model, rows[0], fast, device, autocast, attn_fast, args.max_length)
        a = results["agreement"]
        say(f"[bench] agreement on one row ({a['samples']} samples, {a['trained_tokens']} trained tokens): "
            f"loss baseline {a['loss_baseline']:.5f} fast {a['loss_fast']:.5f} |diff| {a['loss_abs_diff']:.2e}; "
            f"grad cosine {a['grad_cosine']:.5f} (LoRA only {a['grad_cosine_lora']:.5f}), "
            f"norm ratio {a['grad_norm_ratio']:.4f}")

    for name in variants:
        elapsed = time.perf_counter() - t0
        if elapsed > args.time_budget_s:
            say(f"[bench] {name}: skipped (time budget: {elapsed:.0f}s used of {args.time_budget_s:.0f}s)")
            continue
        try:
            r = run_variant(name, train_model, model, fast, fast_batches, base_batches, device, autocast, timer,
                            args, attn_fast, say)
        except Exception as e:  # noqa: BLE001 - a failed lever is a result, the others still run
            import traceback
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            if cuda:
                torch.cuda.empty_cache()
        if "seconds" in r:
            tok = tokens * r.pop("passes")
            fl = flops * (tok / tokens)
            if world > 1:
                import torch.distributed as dist
                t = torch.tensor([tok, fl, r["seconds"], r["peak_gib"]], dtype=torch.float64, device=device)
                parts = [torch.zeros_like(t) for _ in range(world)]
                dist.all_gather(parts, t)
                tok, fl = sum(float(p[0]) for p in parts), sum(float(p[1]) for p in parts)
                r["seconds"] = max(float(p[2]) for p in parts)
                r["peak_gib"] = max(float(p[3]) for p in parts)
            r["tokens"] = int(tok)
            r["tokens_per_s"] = tok / r["seconds"]
            r["mfu"] = fl / r["seconds"] / (H100_BF16_PEAK * world)
            say(f"[bench] {name:15s} {r['tokens_per_s']:9.0f} tok/s  MFU {r['mfu']:6.1%}  peak {r['peak_gib']:6.2f} GiB"
                + (f"  ({r['note']})" if r.get("note") else ""))
        else:
            say(f"[bench] {name}: {r}")
        results["variants"][name] = r
        if rank == 0 and args.out:  # after every variant: a run cut short keeps what it measured
            Path(args.out).write_text(json.dumps(results, indent=1))

    results["seconds_total"] = time.perf_counter() - t0
    if rank == 0:
        summary(results, say)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def run_variant(name, train_model, model, fast, fast_batches, base_batches, device, autocast, timer, args,
                attn_fast, say):
    repeat = args.repeat
    if name == "baseline":
        set_attention(model, "eager")
        try:
            secs, peak = run_steps(train_model, baseline_step, base_batches[:1] + base_batches, device, autocast,
                                   timer)
        finally:
            set_attention(model, attn_fast)
        return {"seconds": secs, "peak_gib": peak, "passes": 1}
    if name == "packed_full":
        secs, peak = run_steps(train_model, packed_full_step, fast_batches[:1] + fast_batches * repeat, device,
                               autocast, timer)
        return {"seconds": secs, "peak_gib": peak, "passes": repeat}
    step = make_chunked_step(fast if name != "mem_lean" else FastPath(chunk_size=256, softcap=fast.softcap))
    if name == "chunked":
        set_lora_input_casting(model, True)
    elif name in ("chunked_nocast", "mem_lean", "ckpt_auto", "compiled_all", "compiled", "compiled_nockpt"):
        set_lora_input_casting(model, False)
    note = ""
    compiled = name in ("compiled_all", "compiled", "compiled_nockpt")
    if compiled:
        compile_decoder_layers(model, "layer")
        start = time.perf_counter()
        try:
            run_steps(train_model, step, fast_batches[:2], device, autocast, timer, warmup=2)
        except Exception:
            _uncompile(model)
            raise
        note = f"compile warm-up {time.perf_counter() - start:.0f}s; "
    try:
        if name in ("ckpt_auto", "compiled"):
            note += auto_checkpointing(train_model, model, step, fast_batches[0], device, autocast, timer,
                                       args.mem_budget_gib, say)
        if name == "compiled_nockpt":
            set_checkpointed_layers(model, 0)
            note += f"0/{len(model.get_base_model().model.layers)} layers checkpointed"
        secs, peak = run_steps(train_model, step, fast_batches[:1] + fast_batches * repeat, device, autocast, timer)
    finally:
        if compiled:
            _uncompile(model)
        set_checkpointed_layers(model, len(model.get_base_model().model.layers))
    return {"seconds": secs, "peak_gib": peak, "passes": repeat, "note": note.strip("; ")}


def auto_checkpointing(train_model, model, step, batch, device, autocast, timer, budget_gib, say) -> str:
    """Checkpoint only as many layers as the memory budget needs: measure the peak with every layer
    checkpointed and with 4 fewer, and leave out as many as the per-layer cost allows."""
    n_layers = len(model.get_base_model().model.layers)
    if not timer.cuda:
        set_checkpointed_layers(model, n_layers - 1)
        return "cpu: one layer not checkpointed"
    set_checkpointed_layers(model, n_layers)
    _, peak_all = run_steps(train_model, step, [batch], device, autocast, timer, warmup=0)
    probe = min(4, n_layers)
    set_checkpointed_layers(model, n_layers - probe)
    _, peak_probe = run_steps(train_model, step, [batch], device, autocast, timer, warmup=0)
    per_layer = max((peak_probe - peak_all) / probe, 1e-3)
    free_layers = int((budget_gib - peak_all) / per_layer)
    keep = max(0, min(n_layers, n_layers - free_layers))
    set_checkpointed_layers(model, keep)
    note = (f"{keep}/{n_layers} layers checkpointed (peak {peak_all:.1f} GiB with all, "
            f"+{per_layer:.2f} GiB per layer left out, budget {budget_gib:.0f} GiB)")
    say(f"[bench] ckpt_auto: {note}")
    return note


def _uncompile(model):
    for layer in model.get_base_model().model.layers:
        layer._compiled_call_impl = None


def agreement(model, row, fast, device, autocast, attn_fast, max_length) -> dict:
    """Loss and LoRA/norm gradients of one packed row: per-sample eager baseline vs the fast path,
    dropout off, same weights."""
    set_dropout(model, 0.0)
    docs = split_row(row)
    n_items = sum(trained_count(d["labels"]) for d in docs)
    padded = PaddedCollator(pad_id=0)
    model.zero_grad(set_to_none=True)
    set_attention(model, "eager")
    loss_base = 0.0
    try:
        for d in docs:
            with autocast():
                loss_base += float(baseline_step(model, to_device(padded([d]), device), num_items=n_items))
    finally:
        set_attention(model, attn_fast)
    g_base = trainable_grads(model)
    lora_mask = torch.cat([torch.full((p.numel(),), "lora" in n, device=g_base.device)
                           for n, p in model.named_parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    with autocast():
        loss_fast = float(make_chunked_step(fast)(model, to_device(PackedCollator(0, max_length)([row]), device),
                                                  num_items=n_items))
    g_fast = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    set_dropout(model, 0.05)
    cos = torch.nn.functional.cosine_similarity
    return {"samples": len(docs), "trained_tokens": n_items, "loss_baseline": loss_base, "loss_fast": loss_fast,
            "loss_abs_diff": abs(loss_base - loss_fast), "grad_cosine": float(cos(g_base, g_fast, dim=0)),
            "grad_cosine_lora": float(cos(g_base[lora_mask], g_fast[lora_mask], dim=0)),
            "grad_norm_ratio": float(g_fast.norm() / g_base.norm())}


def summary(results: dict, say) -> None:
    v = results["variants"]
    base = v.get("baseline", {}).get("tokens_per_s")
    say("[bench] summary: variant, tokens/s, x baseline, MFU, peak GiB")
    for name, r in v.items():
        if "tokens_per_s" not in r:
            say(f"  {name:15s} {r.get('error', 'skipped')}")
            continue
        speedup = f"{r['tokens_per_s'] / base:5.2f}x" if base else "   - "
        say(f"  {name:15s} {r['tokens_per_s']:9.0f} {speedup} {r['mfu']:6.1%} {r['peak_gib']:7.2f}")
    say("[bench] json " + json.dumps({k: results[k] for k in ("date", "device", "world_size", "versions")}
                                     | {"agreement": results.get("agreement"),
                                        "variants": {n: {k: r.get(k) for k in ("tokens_per_s", "mfu", "peak_gib",
                                                                               "note", "error")}
                                                     for n, r in v.items()}}))


def _versions() -> dict:
    import peft
    import transformers
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


if __name__ == "__main__":
    sys.exit(main())
