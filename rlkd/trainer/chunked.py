"""LM head + distillation loss in chunks of positions, never holding the (positions x vocab) logits for the batch.

At T = 4,096 positions and V = 49,152 a float32 logits tensor is 805 MB, and a naive loss keeps several of them
(logits, log-softmax, masks, their gradients). :func:`chunked_distill_loss` takes the final hidden states instead
and, chunk by chunk, computes the logits, the loss terms and their sums, then drops the chunk. Backward recomputes
each chunk's logits and loss (one more LM-head matmul per chunk) and accumulates the gradients of the hidden states,
the LM-head weight and bias. The same idea as Liger-Kernel's fused linear losses (``LigerFusedLinearCrossEntropy``,
which computes the gradient during forward instead of recomputing) and Apple's Cut Cross-Entropy (Wijmans et al.
2024, arXiv 2411.09009), in plain PyTorch so it runs on CPU too.

Peak extra memory is three float32 (chunk_size x V) tensors at once (in backward: the recomputed logits, the
``exp`` the loss saves from them, and their gradient) plus the float32 (V x H) and (N x H) gradients; nothing grows
with N x V (``tests/test_chunked.py`` checks the bound). At V = 49,152 one (1024 x V) float32 tensor is 201 MB, so
chunk 1024 adds ~0.6 GB and chunk 256 ~0.15 GB; the loss time hardly changes between them on CPU. For a whole step the
student's layer activations are the larger share unless gradient checkpointing is on (``bench/stage2.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlkd.core.targets import TeacherTargets
from rlkd.trainer.losses import LOSS_TERMS, DistillLoss

__all__ = ["chunked_distill_loss"]


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _ChunkedDistill(torch.autograd.Function):
    """sums (len(LOSS_TERMS),) = sum over positions of every term of ``loss(hidden @ W.T + b, targets)``."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, loss: DistillLoss,
                targets: TeacherTargets, chunk_size: int) -> Tensor:
        device_type = hidden.device.type
        # Autocast (bf16 on GPU) is active here but not in backward: record it to replay the same matmul precision.
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.loss, ctx.targets, ctx.chunk_size = loss, targets, chunk_size
        ctx.has_bias = bias is not None
        ctx.save_for_backward(hidden, weight, *([bias] if bias is not None else []))
        n_pos = hidden.shape[0]
        sums = torch.zeros(len(LOSS_TERMS), dtype=torch.promote_types(hidden.dtype, torch.float32),
                           device=hidden.device)
        for start, end in _chunks(n_pos, chunk_size):
            logits = F.linear(hidden[start:end], weight, bias)  # (c, V)
            out = loss(logits, targets.slice(start, end), check=False)
            sums += torch.stack([out[name].sum() for name in LOSS_TERMS]).to(sums.dtype)
            del logits, out  # this chunk's (c, V) tensors go before the next chunk's are made
        return sums

    @staticmethod
    def backward(ctx, grad_sums: Tensor):
        hidden, weight, *rest = ctx.saved_tensors
        bias = rest[0] if ctx.has_bias else None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        device_type, amp_enabled, amp_dtype = ctx.autocast
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        w_cast = None
        for start, end in _chunks(hidden.shape[0], ctx.chunk_size):
            h_c = hidden[start:end]  # (c, H)
            with torch.no_grad(), torch.autocast(device_type, dtype=amp_dtype, enabled=amp_enabled):
                logits = F.linear(h_c, weight, bias)  # (c, V) recomputed, same precision as forward
            logits.requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device_type, dtype=amp_dtype, enabled=amp_enabled):
                out = ctx.loss(logits, ctx.targets.slice(start, end), check=False)
                objective = sum(grad_sums[i] * out[name].sum() for i, name in enumerate(LOSS_TERMS)
                                if out[name].requires_grad)
            if not torch.is_tensor(objective):  # nothing in this chunk depends on the logits
                continue
            (g,) = torch.autograd.grad(objective, logits)  # (c, V), dtype of the logits
            del out, objective, logits
            if w_cast is None:
                w_cast = weight.to(g.dtype)  # one (V, H) cast per backward under autocast; free when dtypes match
            if need_h:
                grad_h[start:end] = (g @ w_cast).to(grad_h.dtype)  # (c, H)
            if need_w:
                if g.dtype == acc_dtype and h_c.dtype == acc_dtype:
                    grad_w.addmm_(g.t(), h_c)  # (V, H) in place, no temporary
                else:
                    grad_w += (g.t() @ h_c.to(g.dtype)).to(acc_dtype)
            if need_b:
                grad_b += g.sum(dim=0).to(acc_dtype)
            del g
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None)


class _EagerChunkedDistill(torch.autograd.Function):
    """Like :class:`_ChunkedDistill`, but the gradient of ``total`` is computed chunk by chunk during forward (as
    Liger-Kernel does) and only scaled in backward: no recomputation, one LM-head matmul fewer per chunk. Returns
    ``(total_sum, other_sums)``; only ``total_sum`` is differentiable."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, loss: DistillLoss,
                targets: TeacherTargets, chunk_size: int) -> tuple[Tensor, Tensor]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        sums = torch.zeros(len(LOSS_TERMS), dtype=torch.promote_types(hidden.dtype, torch.float32),
                           device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device) if need_b else None
        w_cast = None
        i_total = LOSS_TERMS.index("total")
        for start, end in _chunks(hidden.shape[0], chunk_size):
            h_c = hidden[start:end]  # (c, H)
            logits = F.linear(h_c, weight, bias).requires_grad_(True)  # (c, V); autograd is off in forward
            with torch.enable_grad():
                out = loss(logits, targets.slice(start, end), check=False)
                total = out["total"].sum()
            sums += torch.stack([out[name].detach().sum() for name in LOSS_TERMS]).to(sums.dtype)
            if total.requires_grad:
                (g,) = torch.autograd.grad(total, logits)  # (c, V)
                del out, logits, total
                if w_cast is None:
                    w_cast = weight.to(g.dtype)
                if need_h:
                    grad_h[start:end] = (g @ w_cast).to(grad_h.dtype)
                if need_w:
                    if g.dtype == acc_dtype and h_c.dtype == acc_dtype:
                        grad_w.addmm_(g.t(), h_c)
                    else:
                        grad_w += (g.t() @ h_c.to(g.dtype)).to(acc_dtype)
                if need_b:
                    grad_b += g.sum(dim=0).to(acc_dtype)
                del g
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None)
        others = sums.clone()
        ctx.mark_non_differentiable(others)
        return sums[i_total].clone(), others

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_others: Tensor):
        grads = tuple(None if g is None else g * grad_total.to(g.dtype) for g in ctx.grads)
        ctx.grads = None  # free the stored gradients once used
        return (*grads, None, None, None)


def chunked_distill_loss(hidden: Tensor, lm_head_weight: Tensor, targets: TeacherTargets, loss: DistillLoss,
                         chunk_size: int = 256, lm_head_bias: Tensor | None = None, *,
                         grad_in_forward: bool = False) -> dict[str, Tensor]:
    """Sums over positions of every term of ``loss(hidden @ lm_head_weight.T + lm_head_bias, targets)``.

    Args:
        hidden: (N, H) final hidden states of the N trained positions (after the final norm), in the order of
            ``targets`` (e.g. ``hidden_states[mb.target_mask]`` of a :func:`rlkd.core.targets.collate` batch).
        lm_head_weight: (V, H) output embedding (tied or not); lm_head_bias: optional (V,).
        targets: :class:`TeacherTargets` with N rows.
        loss: the :class:`DistillLoss` that gives per-position terms.
        chunk_size: positions per chunk; peak memory grows with ``chunk_size * V``.

    Returns:
        dict ``{name: scalar}`` for every name of ``LOSS_TERMS`` (``kd``, ``rank``, ``ce``, ``total``, ``overlap``):
        SUMS over the N positions (divide by the token count yourself, e.g. across gradient-accumulation steps).
        Any combination of them can be back-propagated; each chunk is recomputed once in backward.
        grad_in_forward: compute the gradient of ``total`` during forward instead (Liger-style): saves one LM-head
            matmul per chunk and the recomputation, keeps the (N, H) and (V, H) gradients from forward to backward,
            and makes only ``total`` differentiable (the other sums come back detached). Backward may run once.
    Values and gradients equal ``{k: v.sum() for k, v in loss(hidden @ W.T + b, targets).items()}`` up to float
    summation order.
    """
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and lm_head_weight (V, H), got {tuple(hidden.shape)} and "
                         f"{tuple(lm_head_weight.shape)}")
    if len(targets) != hidden.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} positions but the teacher targets have {len(targets)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    loss.check_targets(targets, lm_head_weight.shape[0])  # once per call (one sync), not once per chunk
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, lm_head_weight, lm_head_bias))
    if grad_in_forward and needs_grad:
        total, others = _EagerChunkedDistill.apply(hidden, lm_head_weight, lm_head_bias, loss, targets, chunk_size)
        return {name: total if name == "total" else others[i] for i, name in enumerate(LOSS_TERMS)}
    sums = _ChunkedDistill.apply(hidden, lm_head_weight, lm_head_bias, loss, targets, chunk_size)
    return {name: sums[i] for i, name in enumerate(LOSS_TERMS)}
