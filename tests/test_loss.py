"""PPO/GRPO loss: hand-computed values, the identity case, and micro-batch gradient equivalence."""

import math
import random

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from learner.batching import TrainSample, assign_loss_weights, collate, make_micro_batches
from learner.loss import merge_loss_metrics, policy_loss, sequence_logprobs, shared_prefix_len


def _hand_case():
    """Two samples of two rollouts; sample a has 2 response tokens, sample b has 1."""
    mask = torch.tensor([[False, True, True], [False, True, False]])
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.5, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.0 - math.log(1.5), -2.0 - math.log(0.9)], [0.0, -1.5 - math.log(0.5), 0.0]])
    ref = torch.tensor([[0.0, -1.0 + math.log(2.0), -2.0], [0.0, -1.5, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    weights = torch.tensor([1 / (2 * 1 * 2), 1 / (1 * 1 * 2)])
    return logp, old, ref, adv, weights, mask


def test_hand_computed_loss_and_metrics():
    logp, old, ref, adv, weights, mask = _hand_case()
    loss, m = policy_loss(logp, old, adv, weights, mask, ref_logprobs=ref, clip=0.2, kl_coef=0.1)
    # a: ratios 1.5 (clipped to 1.2) and 0.9 with A=+1 -> pg -1.2, -0.9
    # b: ratio 0.5 with A=-2 -> min(-1.0, 0.8 * -2 = -1.6) -> pg 1.6
    pg = 0.25 * (-1.2 - 0.9) + 0.5 * 1.6
    kl = 0.25 * (2.0 - math.log(2.0) - 1.0)  # k3 at ref - logp = log 2, zero elsewhere
    assert m["pg_loss"] == pytest.approx(pg, abs=1e-6)
    assert m["kl"] == pytest.approx(kl, abs=1e-6)
    assert float(loss.detach()) == pytest.approx(pg + 0.1 * kl, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 3)
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.9 + 0.5) / 3, abs=1e-6)
    assert m["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    assert m["tokens"] == 3
    # gradient: clipped tokens get none from the surrogate; token a2 gets -A * w * ratio
    loss_pg, _ = policy_loss(logp, old, adv, weights, mask, ref_logprobs=None)
    (grad,) = torch.autograd.grad(loss_pg, logp)
    assert grad[0, 1] == 0 and grad[1, 1] == 0
    assert float(grad[0, 2]) == pytest.approx(-0.25 * 0.9, abs=1e-6)


def test_identity_case_is_minus_the_weighted_mean_advantage():
    """old == current and ref == current: ratio 1, KL 0, loss = -(mean over rollouts of mean A)."""
    mask = torch.tensor([[False, True, True, True], [False, False, True, False], [False, True, True, False]])
    logp = torch.tensor([[0.0, -1.0, -2.0, -0.5], [0, 0, -3.0, 0], [0, -0.2, -0.4, 0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 0.5])
    # rollout x holds samples 0 and 1, rollout y holds sample 2
    weights = torch.tensor([1 / (3 * 2 * 2), 1 / (1 * 2 * 2), 1 / (2 * 1 * 2)])
    loss, m = policy_loss(logp, logp.detach(), adv, weights, mask, ref_logprobs=logp.detach(), kl_coef=0.5)
    expected = -(((2.0 + -1.0) / 2) + 0.5) / 2
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    assert m["kl"] == 0.0 and m["clip_frac"] == 0.0 and m["ratio_mean"] == 1.0
    (grad,) = torch.autograd.grad(loss, logp)
    expected_grad = -adv[:, None] * weights[:, None] * mask
    assert torch.allclose(grad, expected_grad, atol=1e-7)


def test_per_token_advantages_and_weights_are_accepted():
    logp, old, ref, adv, weights, mask = _hand_case()
    per_sample, _ = policy_loss(logp, old, adv, weights, mask, ref_logprobs=ref)
    shape = logp.shape
    per_token, _ = policy_loss(logp, old, adv[:, None].expand(shape), weights[:, None].expand(shape), mask, ref)
    assert float(per_sample.detach()) == pytest.approx(float(per_token.detach()))


def _tiny_model(seed):
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).float()


def _random_samples(rng, n_rollouts=3, steps=3):
    samples = []
    for r in range(n_rollouts):
        for t in range(steps):
            p, n = rng.randint(2, 9), rng.randint(1, 7)
            samples.append(
                TrainSample(
                    prompt_ids=[rng.randrange(1, 64) for _ in range(p)],
                    response_ids=[rng.randrange(1, 64) for _ in range(n)],
                    old_logprobs=[0.0] * n,
                    advantage=rng.uniform(-2, 2),
                    rollout_key=f"r{r}",
                    policy_version=0,
                )
            )
    return samples


def _loss_and_grads(model, ref_model, samples):
    model.zero_grad()
    batch = collate(samples)
    logp = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    with torch.no_grad():
        ref = sequence_logprobs(ref_model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    loss, metrics = policy_loss(
        logp, batch["old_logprobs"], batch["advantages"], batch["token_weights"], batch["response_mask"],
        ref_logprobs=ref, clip=0.2, kl_coef=0.1,
    )
    loss.backward()
    return metrics, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def test_micro_batch_gradients_sum_to_the_full_batch_gradient():
    model, ref_model = _tiny_model(0), _tiny_model(1)
    model.train()
    rng = random.Random(0)
    samples = _random_samples(rng)
    assign_loss_weights(samples)
    # old logprobs = current ones shifted, so ratios spread over [0.6, 1.5] and some are clipped
    with torch.no_grad():
        for s in samples:
            b = collate([s])
            lp = sequence_logprobs(model, b["input_ids"], b["attention_mask"], b["response_mask"])[0]
            resp = lp[len(s.prompt_ids):]
            s.old_logprobs = [float(x) + rng.uniform(-0.4, 0.5) for x in resp]

    full_metrics, full = _loss_and_grads(model, ref_model, samples)
    assert full_metrics["clip_frac"] > 0  # the clipped branch is exercised

    micro = make_micro_batches(samples, micro_batch_tokens=24)
    assert len(micro) >= 3
    parts, summed = [], None
    for idx in micro:
        m, g = _loss_and_grads(model, ref_model, [samples[i] for i in idx])
        parts.append(m)
        summed = g if summed is None else {k: summed[k] + g[k] for k in g}
    for name, grad in full.items():
        assert torch.allclose(summed[name], grad, rtol=1e-4, atol=1e-7), name
    assert any(float(g.abs().max()) > 0 for g in full.values())
    merged = merge_loss_metrics(parts)
    for key in ("loss", "pg_loss", "kl", "tokens", "clip_frac", "ratio_mean", "ratio_max"):
        assert merged[key] == pytest.approx(full_metrics[key], rel=1e-5, abs=1e-7), key


def test_sequence_logprobs_matches_a_manual_log_softmax_and_ignores_padding():
    model = _tiny_model(0).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[False, False, False, True, True]])
    with torch.no_grad():
        lp, ent = sequence_logprobs(model, ids, torch.ones_like(ids), mask, with_entropy=True)
        logits = model(input_ids=ids).logits.float()
        manual = torch.log_softmax(logits[0, 2:4], -1).gather(-1, ids[0, 3:5, None]).squeeze(-1)
        assert torch.allclose(lp[0, 3:], manual, atol=1e-6)
        assert lp[0, :3].abs().sum() == 0 and ent[0, :3].abs().sum() == 0
        assert bool((ent[0, 3:] > 0).all()) and bool((ent[0, 3:] <= math.log(64) + 1e-5).all())
        other = TrainSample([1, 2, 3, 4, 5, 6, 7], [8, 9], [0.0, 0.0], 0.0, "x", 0)
        alone = TrainSample([5, 6, 7], [8, 9], [0.0, 0.0], 0.0, "y", 0)
        batch = collate([other, alone])
        padded = sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        assert torch.allclose(padded[1, 3:5], lp[0, 3:5], atol=1e-5)


def test_response_at_position_zero_is_refused():
    model = _tiny_model(0)
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="position 0"):
        sequence_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[True, True]]))


def _prefixed_samples(rng, system, n=5):
    """Samples whose prompts all start with `system` (as memory-step prompts start with the system prompt)."""
    out = []
    for r in range(n):
        p, k = rng.randint(1, 6), rng.randint(1, 5)
        out.append(
            TrainSample(
                prompt_ids=system + [rng.randrange(1, 64) for _ in range(p)],
                response_ids=[rng.randrange(1, 64) for _ in range(k)],
                old_logprobs=[0.0] * k, advantage=rng.uniform(-2, 2), rollout_key=f"r{r % 2}", policy_version=0,
            )
        )
    return out


def _logprobs_and_grads(model, batch, share_prefix):
    model.zero_grad()
    logp, ent = sequence_logprobs(
        model, batch["input_ids"], batch["attention_mask"], batch["response_mask"], with_entropy=True,
        share_prefix=share_prefix,
    )
    (logp * torch.linspace(0.5, 1.5, logp.shape[1])).sum().backward()  # weights every position differently
    return logp.detach(), ent, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("system_len", [1, 9])
def test_shared_prefix_gives_the_same_logprobs_entropy_and_gradients(system_len):
    model = _tiny_model(0).train()
    rng = random.Random(system_len)
    system = [rng.randrange(1, 64) for _ in range(system_len)]
    samples = _prefixed_samples(rng, system)
    batch = collate(samples, pad_id=0)
    limit = min(len(s.prompt_ids) for s in samples) - 1
    assert shared_prefix_len(batch["input_ids"], limit) >= min(system_len, limit)
    full_lp, full_ent, full_grads = _logprobs_and_grads(model, batch, share_prefix=False)
    lp, ent, grads = _logprobs_and_grads(model, batch, share_prefix=True)
    assert torch.allclose(lp, full_lp, atol=1e-5)
    assert torch.allclose(ent, full_ent, atol=1e-5)
    assert full_lp[batch["response_mask"]].abs().min() > 0  # every response token was scored
    for name, g in full_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


def test_shared_prefix_len_stops_at_the_first_difference_and_the_limit():
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 5], [1, 2, 3, 4, 0]])
    assert shared_prefix_len(ids, limit=5) == 3
    assert shared_prefix_len(ids, limit=2) == 2
    assert shared_prefix_len(ids[:1], limit=5) == 0  # one row: nothing to share
    assert shared_prefix_len(torch.tensor([[7, 1], [8, 1]]), limit=2) == 0


def test_gradient_checkpointing_falls_back_to_full_sequences():
    """transformers drops the key/value cache under checkpointing; the result must not change."""
    model = _tiny_model(0).train()
    samples = _prefixed_samples(random.Random(3), system=[5, 6, 7, 8])
    batch = collate(samples, pad_id=0)
    plain_lp, _, plain_grads = _logprobs_and_grads(model, batch, share_prefix=False)
    model.gradient_checkpointing_enable()
    lp, _, grads = _logprobs_and_grads(model, batch, share_prefix=True)
    assert torch.allclose(lp, plain_lp, atol=1e-5)
    for name, g in plain_grads.items():
        assert torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_logprobs_are_of_the_rollout_temperature_so_the_on_policy_ratio_is_one(temperature):
    """The engine reports logprobs of the tempered distribution (vLLM processed_logprobs):
    log_softmax(logits / T). The learner must score that same distribution, entropy included."""
    model = _tiny_model(0).eval()
    samples = _random_samples(random.Random(5), n_rollouts=2, steps=2)
    assign_loss_weights(samples)
    entropies = []
    with torch.no_grad():
        for s in samples:  # behaviour logprobs computed by hand, one unbatched sequence at a time
            p = len(s.prompt_ids)
            logits = model(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0, p - 1:-1].float()
            lp = torch.log_softmax(logits / temperature, -1)
            s.old_logprobs = lp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1).tolist()
            entropies.append(-(lp.exp() * lp).sum(-1))
        batch = collate(samples)
        args = (model, batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        logp, ent = sequence_logprobs(*args, with_entropy=True, temperature=temperature)
        untempered = sequence_logprobs(*args)
    mask = batch["response_mask"]
    assert torch.allclose(logp[mask], batch["old_logprobs"][mask], atol=1e-5)
    assert torch.allclose(ent[mask], torch.cat(entropies), atol=1e-5)
    assert (untempered[mask] - batch["old_logprobs"][mask]).abs().max() > 1e-2  # temperature 1 is off-policy
    _, m = policy_loss(logp, batch["old_logprobs"], batch["advantages"], batch["token_weights"], mask)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["clip_frac"] == 0.0


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_temperature_is_refused(temperature):
    model = _tiny_model(0)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="temperature"):
        sequence_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[False, True, True]]), temperature=temperature)


@pytest.mark.parametrize("log_ratio", [15.0, -15.0])
def test_k3_kl_of_one_far_token_is_bounded(log_ratio):
    """k3 = exp(d) - d - 1 is about 3.3e6 at d = 15 (14 at d = -15); each token's value is capped at 10."""
    from learner.loss import KL_VALUE_CLAMP

    mask = torch.tensor([[False, True, True]])
    logp = torch.tensor([[0.0, -16.0, -1.0]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[0.0, log_ratio, 0.1]])
    weights = torch.tensor([0.5])  # two response tokens: weights sum to 1
    loss, m = policy_loss(logp, logp.detach(), torch.zeros(1), weights, mask, ref_logprobs=ref, kl_coef=1.0)
    near = math.exp(0.1) - 0.1 - 1.0
    assert KL_VALUE_CLAMP == 10.0
    assert m["kl"] == pytest.approx(0.5 * (KL_VALUE_CLAMP + near), rel=1e-5)
    loss.backward()
    assert float(logp.grad[0, 1]) == 0.0  # the capped token pushes no gradient
    assert float(logp.grad[0, 2]) == pytest.approx(0.5 * (1.0 - math.exp(0.1)), rel=1e-4)  # d(k3)/d(logp)
