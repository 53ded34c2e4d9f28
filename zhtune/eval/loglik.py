"""`--eval_mode loglik`: multiple choice scored by log-likelihood, without generating anything.

For every item the prompt is the same chat-rendered text as in generate mode (`--eval_prompt` decides
it), with the assistant turn opened (`engine.encode_prompt`). Then, as lm-evaluation-harness does:
  - acc: each option LABEL ("A", "B", ...; the labels the prompt showed) is scored by the model's
    log-probability of it as the first thing the assistant says; the highest one is the answer.
  - acc_norm: each option TEXT is scored by the sum of its tokens' log-probabilities as the
    assistant's reply, divided by its length in UTF-8 bytes; the highest one is the answer. (The
    harness puts the text after "Answer: " with a leading space; here the assistant turn starts with
    it, so there is no space.)
A base model is judged on what it prefers, not on whether it follows a chat format, so the numbers mean
something even where generate mode reads "no answer".

Sequences (prompt + option text) are left-padded and batched (`--eval_batch_size` sequences per forward
pass); only the last positions' logits are computed (`logits_to_keep`), so the 262k-word vocabulary of
Gemma 3 costs little. The label scores come from the same forward pass (the position right after the
prompt) when every label is one token, which it is for "A".."E" in the tokenizers zhtune ships.

Shared prompts (transformers models, every label one token, no sequence longer than the model's sliding
window): each prompt runs once (`--eval_batch_size` prompts per forward pass, left-padded, its KV cache
kept), the cache is repeated for the item's options and only the option tokens run on it — the same log
probabilities (tests/test_eval_modes.py compares both paths) at about half the cost for four options
(measured 2026-11-29: 104 ARC-style items, 2-core CPU, bf16: see zhtune/eval/README.md).
Runs on the pt backend only: `engine.model` and `engine.tokenizer` are used directly.
"""

import time
from dataclasses import dataclass

from zhtune.log import logger


@dataclass
class Request:
    item: int  # index of the item
    prompt: list[int]
    continuation: list[int]
    option: int | None = None  # the option whose text this is (None: a multi-token label)
    label: int | None = None  # the option whose label this is, for multi-token labels


@dataclass
class ItemScores:
    label_logprobs: list[float]  # per option: log P(label | prompt)
    text_logprobs: list[float]  # per option: log P(text | prompt), summed over its tokens
    text_bytes: list[int]

    @property
    def pred(self) -> int:
        return max(range(len(self.label_logprobs)), key=lambda i: self.label_logprobs[i])

    @property
    def norm_scores(self) -> list[float]:
        return [lp / max(n, 1) for lp, n in zip(self.text_logprobs, self.text_bytes)]

    @property
    def pred_norm(self) -> int:
        scores = self.norm_scores
        return max(range(len(scores)), key=lambda i: scores[i])


def score_choices(engine, conversations: list[list[dict]], options: list[list[str]], labels: list[str],
                  batch_size: int = 8, label: str = "", share_prompt: bool | None = None) -> list[ItemScores]:
    """Log-likelihood scores of every item's options. `options[i]`: the option texts of item i,
    `labels[i]`: the labels its prompt showed ("ABCD"). `share_prompt`: None (default) shares prompts
    wherever it can (see above), False never, True or an error."""
    tok = engine.tokenizer
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    if share_prompt is not False:
        prompts = [engine.encode_prompt(m) for m in conversations]
        texts = [[encode(t) for t in opts] for opts in options]
        shown = [[encode(x) for x in item_labels] for item_labels in labels]
        if _can_share(engine.model, prompts, texts, shown):
            return _score_shared(engine, prompts, texts, [[x[0] for x in ids] for ids in shown], options,
                                 batch_size, label)
        if share_prompt:
            raise ValueError("share_prompt=True, but these items or this model cannot share prompts")
    requests, label_tokens = [], []
    for i, (messages, texts, shown) in enumerate(zip(conversations, options, labels)):
        prompt = engine.encode_prompt(messages)
        ids = [encode(x) for x in shown]
        label_tokens.append([x[0] if len(x) == 1 else None for x in ids])
        requests += [Request(i, prompt, encode(text), option=j) for j, text in enumerate(texts)]
        requests += [Request(i, prompt, x, label=j) for j, x in enumerate(ids) if len(x) != 1]
    results = [ItemScores([0.0] * len(t), [0.0] * len(t), [len(x.encode("utf-8")) for x in t]) for t in options]
    order = sorted(range(len(requests)), key=lambda r: -(len(requests[r].prompt) + len(requests[r].continuation)))
    start, done, step = time.time(), 0, max(1, len(order) // 10)
    for b in range(0, len(order), batch_size):
        batch = [requests[r] for r in order[b:b + batch_size]]
        for req, (total, after_prompt) in zip(batch, _forward(engine, batch)):
            scores = results[req.item]
            if req.label is not None:
                scores.label_logprobs[req.label] = total
                continue
            scores.text_logprobs[req.option] = total
            if req.option == 0:
                for j, token in enumerate(label_tokens[req.item]):
                    if token is not None:
                        scores.label_logprobs[j] = float(after_prompt[token])
        done += len(batch)
        if done // step != (done - len(batch)) // step or done == len(order):
            logger.info(f"loglik {label}: {done}/{len(order)} sequences ({time.time() - start:.0f}s)")
    return results


# Logits of the kept positions are batch x positions x vocabulary (262k for Gemma): a batch is split
# so that they stay under this many elements (2 GiB in bf16), and log-softmax runs row by row.
_LOGIT_BUDGET = 2**30


def _forward(engine, batch: list[Request]):
    """(sum of the continuation's log-probs, log-probs of the next token after the prompt) per request."""
    import torch

    keep = max(len(r.continuation) for r in batch) + 1
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    rows = max(1, _LOGIT_BUDGET // (keep * vocab))
    if len(batch) > rows:
        return [x for i in range(0, len(batch), rows) for x in _forward(engine, batch[i:i + rows])]
    seqs = [r.prompt + r.continuation for r in batch]
    width = max(map(len, seqs))
    pad = engine.tokenizer.pad_token_id or 0
    device = next(engine.model.parameters()).device
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with engine.lock, torch.no_grad():
        logits = engine.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                              logits_to_keep=keep, use_cache=False).logits  # position j predicts token width-keep+j+1
        out = []
        for row, r in zip(logits, batch):
            n = len(r.continuation)
            first = keep - n - 1  # the position right after the prompt
            logprobs = torch.log_softmax(row[first:first + max(n, 1)].float(), dim=-1)
            targets = torch.tensor(r.continuation, device=device, dtype=torch.long)
            total = logprobs[:n].gather(-1, targets[:, None]).sum().item() if n else 0.0
            out.append((total, logprobs[0].cpu()))
    return out


# -- shared prompts ----------------------------------------------------------------------------------

def _can_share(model, prompts, texts, shown) -> bool:
    """A transformers model (a KV cache to reuse), single-token labels, and no sequence longer than
    the sliding window (so no cache layer ever drops a prompt position)."""
    config = getattr(model, "config", None)
    if config is None or not all(len(x) == 1 for ids in shown for x in ids):
        return False
    window = getattr(config, "sliding_window", None)
    longest = max((len(p) + max((len(t) for t in opts), default=0) for p, opts in zip(prompts, texts)), default=0)
    return not window or longest <= window


def _score_shared(engine, prompts, texts, label_tokens, options, batch_size: int, label: str) -> list[ItemScores]:
    results = [ItemScores([0.0] * len(t), [0.0] * len(t), [len(x.encode("utf-8")) for x in t]) for t in options]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    vocab = engine.model.get_output_embeddings().weight.shape[0]
    start, done, step = time.time(), 0, max(1, len(order) // 10)
    b = 0
    while b < len(order):
        items = order[b:b + batch_size]
        # the options' kept logits (rows x longest option x vocabulary) stay under the budget
        while len(items) > 1 and (sum(len(texts[i]) for i in items) * max(len(t) for i in items for t in texts[i])
                                  * vocab) > _LOGIT_BUDGET:
            items = items[:len(items) // 2]
        for i, (label_scores, text_scores) in zip(items, _forward_shared(engine, [prompts[i] for i in items],
                                                                           [texts[i] for i in items],
                                                                           [label_tokens[i] for i in items])):
            results[i].label_logprobs, results[i].text_logprobs = label_scores, text_scores
        b += len(items)
        done_before, done = done, done + len(items)
        if done // step != done_before // step or done == len(order):
            logger.info(f"loglik {label}: {done}/{len(order)} prompts, options on their shared cache "
                        f"({time.time() - start:.0f}s)")
    return results


def _forward_shared(engine, prompts, texts, label_tokens):
    """Per item: (log P(label) per option, summed log P(option text) per option), the prompt run once."""
    import torch

    from zhtune.infer.batching import cache_kwarg

    model = engine.model
    pad = engine.tokenizer.pad_token_id or 0
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = cache_kwarg(model)
    rows = [(i, j) for i, opts in enumerate(texts) for j, t in enumerate(opts) if len(t) > 1]
    with engine.lock, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=bool(rows),
                    logits_to_keep=1)
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # the position right after each prompt
        text_scores = [[float(first[i, t[0]]) if t else 0.0 for t in opts] for i, opts in enumerate(texts)]
        if rows:
            cache = getattr(out, "cache", None) or out.past_key_values
            cache.batch_select_indices(torch.tensor([i for i, _ in rows], device=device))
            feed = [texts[i][j][:-1] for i, j in rows]  # the last token is only predicted
            longest = max(map(len, feed))
            opt_ids = torch.tensor([f + [pad] * (longest - len(f)) for f in feed], device=device)
            opt_mask = torch.tensor([[1] * len(f) + [0] * (longest - len(f)) for f in feed], device=device)
            full_mask = torch.cat([mask[[i for i, _ in rows]], opt_mask], dim=1)
            opt_pos = torch.tensor([[len(prompts[i]) + k for k in range(longest)] for i, _ in rows], device=device)
            logits = model(input_ids=opt_ids, attention_mask=full_mask, position_ids=opt_pos, use_cache=True,
                           **{cache_arg: cache}).logits
            for row, ((i, j), f) in zip(logits, zip(rows, feed)):
                target = torch.tensor(texts[i][j][1:], device=device, dtype=torch.long)
                logprobs = torch.log_softmax(row[:len(f)].float(), dim=-1)
                text_scores[i][j] += logprobs.gather(-1, target[:, None]).sum().item()
    return [([float(first[i, t]) for t in label_tokens[i]], text_scores[i]) for i in range(len(prompts))]
