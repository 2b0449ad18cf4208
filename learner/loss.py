"""PPO / GRPO policy loss with a low-variance KL term, and per-token log-probabilities (torch).

Aggregation (spec section 3): token-mean inside a sample, then mean over the samples of a rollout,
then mean over the rollouts of the training step. Written as one weighted sum over tokens,

    loss = sum_tokens  w_sample * (pg_token + kl_coef * kl_token),
    w_sample = 1 / (response_tokens(sample) * samples_in_rollout(sample) * rollouts_in_batch),

where the weights are computed once over the WHOLE step batch (`learner.batching.assign_loss_weights`).
Because the loss is a plain sum with batch-independent weights, the gradient of one big batch is
exactly the sum of the gradients of its micro-batches (and of the data-parallel ranks' shares),
whatever the micro-batch split. The caller therefore sums micro-batch losses; it never averages.

Tensors are response-aligned on the concatenated `prompt + response` sequence: `[B, L]` with
`response_mask` marking the response tokens (right padding; see `batching.collate`).
"""

from __future__ import annotations

import torch

# k3 = exp(d) - d - 1 overflows for large d: clamp the log-ratio d to +-20 first, then the k3 value
# itself to [-10, 10] (as verl does), so one token far from the reference adds at most 10 per unit
# weight instead of e^20 (k3 >= 0, so in effect a cap of 10; the cap also stops its gradient).
KL_LOG_RATIO_CLAMP = 20.0
KL_VALUE_CLAMP = 10.0


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    with_entropy: bool = False,
    share_prefix: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the response tokens, `[B, L]`, 0 outside `response_mask`.

    Position j's token is scored from the logits at position j-1, in float32:
    `log_softmax(logits / temperature)` over the full vocabulary. The temperature must be the
    rollout's: the engine reports the logprobs of the distribution it sampled from (vLLM
    `processed_logprobs`, after temperature), so only then is the on-policy ratio exactly 1.
    (Top-p / top-k truncation is not applied here; `finemem.config.validate_training` refuses it.)
    Only response positions are gathered before the log-softmax, so memory is
    `[num_response_tokens, vocab]`, not `[B, L, vocab]`. With `with_entropy`, also returns the
    per-token entropy of the same (tempered) distributions (detached: a metric, not a loss term).

    Two savings that leave the result unchanged (tested to float tolerance, gradients included):
    the LM head runs only from the first position that predicts a response token on, and with
    `share_prefix` the tokens every row starts with (the system prompt: about 40% of a memory
    step's tokens) run once and their keys/values are repeated over the batch
    (`shared_prefix_len`). Under gradient checkpointing the cache is dropped by transformers, so
    the prefix is not shared there.
    """
    if not temperature > 0:
        raise ValueError(
            f"sequence_logprobs: temperature must be > 0, got {temperature} (greedy rollouts cannot be trained on)"
        )
    mask = response_mask.bool()
    if mask[:, 0].any():
        raise ValueError("sequence_logprobs: position 0 cannot be a response token (it has no context)")
    length = input_ids.shape[1]
    first_scored = first_scored_position(mask)
    prefix = shared_prefix_len(input_ids, first_scored) if share_prefix and _may_share_prefix(model) else 0
    keep = length - first_scored  # logits of positions first_scored .. L-1
    if prefix:
        cache = model(input_ids=input_ids[:1, :prefix], use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(input_ids.shape[0])
        logits = model(
            input_ids=input_ids[:, prefix:], attention_mask=attention_mask, past_key_values=cache,
            use_cache=True, logits_to_keep=keep,
        ).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    predict = mask[:, 1:]  # [B, L-1]: does position j+1 hold a response token?
    selected = logits[:, :-1][predict[:, first_scored:]].float()  # [N, V]
    if temperature != 1.0:
        selected = selected / temperature
    targets = input_ids[:, 1:][predict]  # [N]
    log_probs = torch.log_softmax(selected, dim=-1)
    token_logprobs = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    out = _scatter_to_positions(token_logprobs, predict)
    if not with_entropy:
        return out
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return out, _scatter_to_positions(entropy, predict)


def first_scored_position(response_mask: torch.Tensor) -> int:
    """The earliest position whose logits score a response token: the first response position
    minus one over all rows (a row without a response token counts as its last position)."""
    mask = response_mask.bool()
    length = mask.shape[1]
    return int(torch.where(mask.any(1), mask.int().argmax(1), length).min()) - 1


def shared_prefix_len(input_ids: torch.Tensor, limit: int) -> int:
    """Length of the token prefix all rows share, at most `limit` (0 for a single row).

    `limit` is the first position whose logits are needed: the prefix pass returns no logits, so
    every scored position must fall in the second pass. Rows are right-padded, so a prefix shorter
    than the first response token holds no padding.
    """
    if input_ids.shape[0] < 2 or limit <= 0:
        return 0
    same = (input_ids[:, :limit] == input_ids[:1, :limit]).all(0)
    return int(same.int().cumprod(0).sum())


def _may_share_prefix(model) -> bool:
    """False while transformers' gradient checkpointing is active (it drops the key/value cache)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    return not (getattr(module, "is_gradient_checkpointing", False) and module.training)


def _scatter_to_positions(values: torch.Tensor, predict: torch.Tensor) -> torch.Tensor:
    """Place N per-token values back at their `[B, L]` positions (shifted by one, zeros elsewhere)."""
    shifted = torch.zeros(predict.shape, dtype=values.dtype, device=values.device).masked_scatter(predict, values)
    first = torch.zeros((predict.shape[0], 1), dtype=values.dtype, device=values.device)
    return torch.cat([first, shifted], dim=1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    token_weights: torch.Tensor,
    response_mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    clip: float = 0.2,
    kl_coef: float = 0.001,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate plus `kl_coef` times the k3 KL estimate, as one weighted token sum.

    Shapes: `logprobs`, `old_logprobs`, `ref_logprobs`, `response_mask` are `[B, L]`;
    `advantages` and `token_weights` are `[B]` (per sample) or `[B, L]`.
    `token_weights` is each response token's weight (see the module docstring); a sample with
    weight 0 contributes nothing (used for the padding micro-batches of data-parallel ranks).

    Per token: ratio r = exp(logp - old); pg = -min(r A, clip(r, 1-c, 1+c) A);
    k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for KL(pi || ref)), clamped to at most
    `KL_VALUE_CLAMP` per token (a biased but bounded estimate, as verl's).

    Metrics (floats): `loss`, `pg_loss`, `kl` (weighted sums: additive over micro-batches and
    ranks), `tokens`, `clip_frac` (share of tokens with |r - 1| > c), `ratio_mean`, `ratio_max`.
    """
    mask = response_mask.to(logprobs.dtype)
    shape = logprobs.shape
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand(shape)
    weights = (token_weights if token_weights.dim() == 2 else token_weights[:, None].expand(shape)) * mask
    adv, weights = adv.to(logprobs.dtype), weights.to(logprobs.dtype)

    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv
    pg_per_token = -torch.minimum(unclipped, clipped)
    pg_loss = (pg_per_token * weights).sum()

    if ref_logprobs is not None:
        diff = torch.clamp((ref_logprobs - logprobs) * mask, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        kl_per_token = torch.clamp(torch.exp(diff) - diff - 1.0, -KL_VALUE_CLAMP, KL_VALUE_CLAMP)
        kl = (kl_per_token * weights).sum()
    else:
        kl = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    loss = pg_loss + kl_coef * kl

    with torch.no_grad():
        on = mask.bool()
        tokens = int(on.sum())
        r = ratio[on]
        metrics = {
            "loss": float(loss.detach()),
            "pg_loss": float(pg_loss.detach()),
            "kl": float(kl.detach()),
            "tokens": float(tokens),
            "clip_frac": float(((r - 1.0).abs() > clip).float().mean()) if tokens else 0.0,
            "ratio_mean": float(r.mean()) if tokens else 0.0,
            "ratio_max": float(r.max()) if tokens else 0.0,
        }
    return loss, metrics


def merge_loss_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Combine the metrics of several micro-batches (or ranks) into those of the whole batch.

    Weighted sums add up, token shares become token-weighted means, `ratio_max` takes the max.
    """
    tokens = sum(p["tokens"] for p in parts)
    merged = {key: sum(p[key] for p in parts) for key in ("loss", "pg_loss", "kl", "tokens")}
    for key in ("clip_frac", "ratio_mean"):
        merged[key] = sum(p[key] * p["tokens"] for p in parts) / tokens if tokens else 0.0
    merged["ratio_max"] = max((p["ratio_max"] for p in parts if p["tokens"]), default=0.0)
    return merged
