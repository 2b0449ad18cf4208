"""The DeepSpeed learner scores tokens at the rollout temperature (real Ray + DeepSpeed on gloo).

The engine's sampling logprobs are those of the tempered distribution (vLLM processed_logprobs:
log_softmax(logits / rollout.temperature)), so a first training step on samples whose old
logprobs were computed that way from the learner's own initial weights is exactly on-policy:
every ratio is 1. The pure counterpart is tests/test_loss.py; the engine side is
tests/test_engine.py::test_learner_logprobs_match_the_engine_at_temperature_0_7.
"""

import random

import pytest

pytestmark = pytest.mark.heavy

TEMPERATURE = 0.7


def _tempered_samples(model_dir, vocab: int):
    """2 rollouts x 2 steps; old logprobs = log_softmax(logits / T) of the initial model, by hand."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.batching import TrainSample, assign_loss_weights

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = random.Random(0)
    samples = []
    for r in range(2):
        for t in range(2):
            prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 8))]
            response = [rng.randrange(vocab) for _ in range(rng.randint(1, 5))]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1].float()
            lp = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, torch.tensor(response)[:, None])
            samples.append(TrainSample(prompt, response, lp.squeeze(-1).tolist(), rng.uniform(-1, 1), f"r{r}", 0,
                                       step=t + 1))
    assign_loss_weights(samples)
    return samples


def test_first_step_at_the_rollout_temperature_is_on_policy(ray_local, tmp_path):
    import torch
    from helpers_tokenizer import build_test_tokenizer
    from omegaconf import OmegaConf
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from finemem.config import FineMemConfig
    from learner.actor import LearnerGroup

    tok = build_test_tokenizer()
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
    )).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    cfg = OmegaConf.structured(FineMemConfig)
    cfg.model.path = str(tmp_path)
    cfg.rollout.temperature = TEMPERATURE
    cfg.learner.micro_batch_tokens = 24  # several micro-batches
    group = LearnerGroup(cfg)
    try:
        m = group.train_step(_tempered_samples(tmp_path, len(tok)))
    finally:
        group.shutdown()
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert m["clip_frac"] == 0.0
    assert m["kl"] == pytest.approx(0.0, abs=1e-9)  # policy == reference, both at the same temperature
