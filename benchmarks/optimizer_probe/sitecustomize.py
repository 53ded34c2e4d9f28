# A diagnostic (eleventh session, issue 16), not part of zhtune: put this folder first on PYTHONPATH and set
# ZH_HOOK=1; every torch optimizer step then prints one "ZHOOK" line: the param groups' (lr, weight_decay)
# and, per kind of trainable tensor (embA: LoRA-A of the embedding, Br/Ar: LoRA B/A of the layers, headB: the
# lm_head's LoRA-B, LN: norms), (norm of the update, norm of the gradient, tensors without a gradient, tensors).
# Written for the seed's LoRA on Gemma 2 (rank 8, vocab 262144). Used to compare `zhtune sft` with and without
# --fsdp fsdp2 step by step (benchmarks/RESULTS.md).
import os
if os.environ.get("ZH_HOOK"):
    from torch.optim.optimizer import register_optimizer_step_pre_hook as R1, register_optimizer_step_post_hook as R2
    S = {}
    F = lambda t: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float()
    def K(p):
        s = tuple(p.shape)
        if len(s) == 1: return "LN"
        return "embA" if s[1] > 99999 else "headB" if s[0] > 99999 else "Ar" if s[0] == 8 else "Br" if s[1] == 8 else str(s)
    def pre(o, a, k):
        S["b"] = [(p, F(p).clone()) for g in o.param_groups for p in g["params"]]
        S["lr"] = [(g["lr"], g.get("weight_decay")) for g in o.param_groups]
    def post(o, a, k):
        d = {}
        for p, b in S["b"]:
            x = d.setdefault(K(p), [0., 0., 0, 0])
            x[0] += (F(p) - b).norm().item() ** 2; x[3] += 1
            if p.grad is None: x[2] += 1
            else: x[1] += F(p.grad).norm().item() ** 2
        print("ZHOOK", S["lr"], {k: (f"{v[0]**.5:.4g}", f"{v[1]**.5:.4g}", v[2], v[3]) for k, v in d.items()}, flush=True)
    R1(pre); R2(post)

# ZH_SHARDED_LIKE (twelfth session): `zhtune sft` without an engine computes as it does under ZeRO-3 / FSDP, to tell
# the sharded computation from the sharding engine. =1: fast_path.sharded_head answers "FSDP" (the model's own loss
# on full logits, no compiled levers, every layer checkpointed by transformers); =loss: only the model's own loss
# on full logits (compiled layers and their levers kept); =eager: only no compiled levers (the chunked loss kept).
MODE = os.environ.get("ZH_SHARDED_LIKE")
if MODE:
    import importlib.abc, importlib.util, sys
    def _patch(module):
        if MODE == "1":
            module.sharded_head = lambda args: "FSDP"
            return
        decide = module.FastPath.decide
        def patched(self, *a, **k):
            out = decide(self, *a, **k)
            if MODE == "loss":
                self.chunked_loss = False
            else:
                self.compile, self.bf16_lora_inputs = False, False
            return out
        module.FastPath.decide = patched
    class _ShardedLike(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "zhtune.train.fast_path":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                _patch(module)
                print(f"ZH_SHARDED_LIKE={MODE}: zhtune.train.fast_path patched", flush=True)
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, _ShardedLike())
