"""Check the staged vllm on the GPU machine (after `scripts/stage_vllm.sh install`).

    . /root/keep/env.sh && timeout 600 python3 scripts/gpu_vllm_check.py --embedded [--hf] [--eager]
    . /root/keep/env.sh && timeout 600 python3 scripts/gpu_vllm_check.py --model DIR

--embedded converts the embedded Gemma 3 270M once through zhtune (ZHTUNE_EMBEDDED_GGUF -> $ZHTUNE_CACHE,
about 75 s) and uses that folder. Prints versions, greedy vllm outputs and, with --hf, whether the
greedy token ids match transformers' on the same prompts. Writes $OUT/vllm_check.json when OUT is set.
"""

import argparse
import json
import os
import sys
import time

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "你好，请介绍一下你自己。"]


def versions():
    import importlib
    out = {}
    for m in ["vllm", "torch", "transformers", "xgrammar", "fastapi", "uvicorn", "openai", "pydantic", "gguf"]:
        try:
            out[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception as e:  # report, go on
            out[m] = f"ERROR {type(e).__name__}: {e}"
    return out


def resolve_model(args):
    if args.model:
        return args.model
    sys.path.insert(0, os.getcwd())
    from zhtune.models.embedded import embedded_model_dir  # may move in the refactor: pass --model then

    t = time.time()
    path = str(embedded_model_dir())
    print(f"[check] embedded model folder {path} ({time.time() - t:.0f}s)", flush=True)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--embedded", action="store_true")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (faster start, no CUDA graphs)")
    ap.add_argument("--hf", action="store_true", help="compare greedy ids with transformers")
    ap.add_argument("--max_tokens", type=int, default=16)
    args = ap.parse_args()
    report = {"versions": versions()}
    print(json.dumps(report["versions"], indent=1), flush=True)
    if not (args.model or args.embedded):
        return report
    model = resolve_model(args)

    from vllm import LLM, SamplingParams

    t = time.time()
    llm = LLM(model=model, dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=2048,
              enforce_eager=args.eager, seed=0)
    report["init_s"] = round(time.time() - t, 1)
    t = time.time()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    report["generate_s"] = round(time.time() - t, 2)
    report["vllm"] = [{"prompt": o.prompt, "text": o.outputs[0].text, "ids": list(o.outputs[0].token_ids)}
                      for o in outs]
    for r in report["vllm"]:
        print(f"[vllm] {r['prompt']!r} -> {r['text']!r}", flush=True)
    if args.hf:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).cuda().eval()
        same = []
        for r in report["vllm"]:
            ids = tok(r["prompt"], return_tensors="pt").input_ids.cuda()
            with torch.no_grad():
                g = hf.generate(ids, max_new_tokens=args.max_tokens, do_sample=False)
            hf_ids = g[0, ids.shape[1]:].tolist()
            n = min(len(hf_ids), len(r["ids"]))
            same.append(hf_ids[:n] == r["ids"][:n])
            print(f"[hf]   {r['prompt']!r} -> {tok.decode(hf_ids)!r} same={same[-1]}", flush=True)
        report["hf_match"] = same
    print(json.dumps({k: v for k, v in report.items() if k != "vllm"}), flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "vllm_check.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)
    return report


if __name__ == "__main__":
    main()
