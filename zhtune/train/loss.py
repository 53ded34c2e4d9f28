"""Causal-LM cross-entropy over a huge vocabulary without ever holding the full logits.

Gemma 2's 256k-token vocabulary makes the logits of 8192 tokens 4 GB in bf16 (8 GB in fp32) before
the final-logit softcap. Here the lm_head runs over chunks of the *trained* tokens only (prompt
tokens, whose labels are -100, never reach it), and each chunk's loss and gradient are computed at
once in the forward pass: the chunk's logits live only inside one loop iteration. The backward pass
then only scales the stored gradients by the incoming gradient (the loss is a scalar).

The lm_head is called as a module, so a PEFT LoRA on it (tied to the embedding or not) trains: the
gradients of its trainable parameters are computed per chunk with `torch.autograd.grad` and handed to
autograd as the gradients of this function's parameter inputs (DDP's hooks fire as usual).

Per chunk, in fp32: y = c * tanh(z / c) (c = final_logit_softcapping, skipped when None),
loss = logsumexp(y) - y[target], dloss/dz = (softmax(y) - onehot(target)) * (1 - tanh(z / c)^2).

`compiled=True` runs that per-chunk arithmetic through torch.compile: eager, each of its ~10 elementwise
passes reads and writes the chunk's fp32 logits (1 GB per 1,024 tokens of a 256k vocabulary, ~24 GB of
memory traffic per chunk); compiled, they fuse into a few kernels that read the logits once and write the
gradient once. Same arithmetic (fp32), rounding aside.
"""

import torch
import torch.nn.functional as F
from torch import nn

from zhtune.templates.base import IGNORE_INDEX



def chunked_causal_lm_loss(hidden_states: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor,
                           final_logit_softcapping: float | None = None, chunk_size: int = 1024,
                           ignore_index: int = IGNORE_INDEX, compiled: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of trained tokens) for `lm_head(hidden_states)` against `labels`.

    hidden_states: [..., T, H] (the decoder's final, normed output); labels: [..., T], NOT shifted
    (token t is scored against labels[t + 1], as transformers' ForCausalLMLoss does). The mean loss is
    loss_sum / n_tokens; divide by a larger count to average over an accumulated batch.
    """
    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1).to(hidden.device)
    keep = (targets != ignore_index).nonzero().squeeze(1)
    n_tokens = int(keep.numel())
    if n_tokens == 0:
        return hidden_states.sum() * 0.0, 0
    hidden = hidden.index_select(0, keep)
    targets = targets.index_select(0, keep)
    params = [p for p in lm_head.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden.requires_grad or params):
        loss = _LinearSoftcapCrossEntropy.apply(hidden, targets, lm_head, final_logit_softcapping, chunk_size,
                                                compiled, *params)
    else:
        loss = hidden.new_zeros((), dtype=torch.float32)
        loss_and_grad = _loss_and_grad_fn(compiled)
        with torch.no_grad():
            for start in range(0, hidden.shape[0], chunk_size):
                z = lm_head(hidden[start:start + chunk_size])
                loss += loss_and_grad(z, targets[start:start + chunk_size], final_logit_softcapping, False)[0]
    return loss, n_tokens


_COMPILED = {}


def _loss_and_grad_fn(compiled: bool):
    """`_loss_and_grad`, or its torch.compile'd form (built once per process)."""
    if not compiled:
        return _loss_and_grad
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_loss_and_grad, dynamic=None)
    return _COMPILED["fn"]


def _loss_and_grad(z: torch.Tensor, targets: torch.Tensor, softcap: float | None, want_grad: bool):
    """Summed softcapped cross-entropy of raw logits z [n, V] and, if wanted, its gradient wrt z
    (in z's dtype). Works in fp32 and in place, so a chunk costs about 3 fp32 copies of its logits."""
    y = z.float()  # a copy when z is bf16; for fp32 z the clone below keeps z intact
    if y is z:
        y = y.clone()
    t = None
    if softcap is not None:
        t = y.div_(softcap).tanh_()  # y and t share storage until y is scaled back
        y = t * softcap
    lse = torch.logsumexp(y, dim=-1)
    picked = y.gather(1, targets[:, None]).squeeze(1)
    loss = (lse - picked).sum()
    if not want_grad:
        return loss, None
    grad = y.sub_(lse[:, None]).exp_()  # softmax, in y's storage
    grad.scatter_add_(1, targets[:, None], grad.new_full((targets.shape[0], 1), -1.0))
    if t is not None:
        grad.mul_(t.square_().neg_().add_(1.0))  # d(c * tanh(z / c)) / dz = 1 - tanh^2
    return loss, grad.to(z.dtype)


class _LinearSoftcapCrossEntropy(torch.autograd.Function):
    """loss_sum = sum CE(softcap(head(hidden)), targets); gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, targets, head, softcap, chunk_size, compiled, *params):
        want_hidden = ctx.needs_input_grad[0]
        loss_and_grad = _loss_and_grad_fn(compiled)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p) for p in params]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].detach().requires_grad_(want_hidden)
            with torch.enable_grad():
                z = head(h)
            loss, dz = loss_and_grad(z.detach(), targets[start:start + chunk_size], softcap, True)
            total += loss
            wrt = ([h] if want_hidden else []) + list(params)
            grads = torch.autograd.grad(z, wrt, grad_outputs=dz, allow_unused=True)
            if want_hidden:
                grad_hidden[start:start + chunk_size] = grads[0]
                grads = grads[1:]
            for acc, g in zip(grad_params, grads):
                if g is not None:
                    acc += g
            del z, dz, grads
        ctx.save_for_backward(grad_hidden, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, *grad_params = ctx.saved_tensors
        scaled_hidden = grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None
        return (scaled_hidden, None, None, None, None, None, *[g * grad_output.to(g.dtype) for g in grad_params])


def full_logits_loss(logits: torch.Tensor, labels: torch.Tensor, final_logit_softcapping: float | None = None,
                     ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, int]:
    """The reference: softcap the full logits, shift, fp32 cross-entropy summed. Same contract as above."""
    logits = logits.float()
    if final_logit_softcapping is not None:
        logits = final_logit_softcapping * torch.tanh(logits / final_logit_softcapping)
    targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index).reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=ignore_index, reduction="sum")
    return loss, int((targets != ignore_index).sum())
