"""Reward maths (finemem.rewards) and the episode scorer with the evidence reader (no LLM)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finemem import rewards
from finemem.config import ConfigError, load_config
from finemem.records import Episode, Instance, MemoryItem, OpResult, QAPair, StepSample
from reward.answerers import EvidenceReader
from reward.scorer import score_episode

# ------------------------------------------------------------------------------------- EARA


def test_eara_hand_computed_example():
    # T=3, two questions. q0 scored 1 with evidence written at steps 1 and 3;
    # q1 scored 0.5 with evidence written at step 3 only. n=2, r_global = 0.75.
    # N_1 = (1/2)(1/2) = 0.25 ; N_2 = 0 ; N_3 = (1/2)(1/2 + 0.5/1) = 0.5
    # r_eara(t) = 0.5 * 0.75 / 3 + 0.5 * N_t = 0.125 + 0.5 N_t
    res = rewards.eara([1.0, 0.5], [[1, 3], [3]], num_steps=3, beta=0.5)
    assert res.r_global == pytest.approx(0.75)
    assert res.credit == pytest.approx([0.25, 0.0, 0.5])
    assert res.rewards == pytest.approx([0.25, 0.125, 0.375])
    assert sum(res.rewards) == pytest.approx(res.r_global)
    assert res.no_evidence_share == 0.0


def test_eara_beta_extremes():
    res0 = rewards.eara([1.0], [[2]], num_steps=4, beta=0.0)
    assert res0.rewards == pytest.approx([0.25] * 4)  # spread evenly
    res1 = rewards.eara([1.0], [[2]], num_steps=4, beta=1.0)
    assert res1.rewards == pytest.approx([0.0, 1.0, 0.0, 0.0])  # all on the writer


@settings(max_examples=300, deadline=None)
@given(
    T=st.integers(1, 12),
    data=st.data(),
    beta=st.floats(0.0, 1.0),
)
def test_eara_conservation_when_every_evidence_set_is_nonempty(T, data, beta):
    n = data.draw(st.integers(1, 10))
    scores = data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    evidence = data.draw(
        st.lists(st.lists(st.integers(1, T), min_size=1, max_size=6), min_size=n, max_size=n)
    )
    res = rewards.eara(scores, evidence, T, beta)
    assert sum(res.rewards) == pytest.approx(res.r_global, abs=1e-9)
    assert res.no_evidence_share == 0.0
    assert all(r >= 0 for r in res.rewards)


def test_eara_random_cases_seeded():
    rng = random.Random(0)
    for _ in range(1000):
        T = rng.randint(1, 20)
        n = rng.randint(1, 8)
        scores = [rng.random() for _ in range(n)]
        evidence = [[rng.randint(1, T) for _ in range(rng.randint(1, 5))] for _ in range(n)]
        res = rewards.eara(scores, evidence, T, rng.random())
        assert abs(sum(res.rewards) - sum(scores) / n) < 1e-12


def test_eara_empty_evidence_gives_share_to_nobody():
    # q1 (score 1) has no evidence: its beta share is lost; the (1-beta) part is still spread.
    res = rewards.eara([1.0, 1.0], [[1], []], num_steps=2, beta=0.5)
    assert res.no_evidence_share == 0.5
    assert res.credit == pytest.approx([0.5, 0.0])
    assert sum(res.rewards) == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)


def test_eara_rejects_bad_input():
    with pytest.raises(ValueError, match="outside 1..2"):
        rewards.eara([1.0], [[3]], num_steps=2)
    with pytest.raises(ValueError, match="evidence sets"):
        rewards.eara([1.0, 0.0], [[1]], num_steps=2)
    with pytest.raises(ValueError, match="beta"):
        rewards.eara([1.0], [[1]], num_steps=2, beta=1.5)
    assert rewards.eara([], [], num_steps=2).rewards == [0.0, 0.0]


# ------------------------------------------------------------------------------ global sampling


def test_global_question_count():
    assert rewards.num_global_questions(10, 0.2) == 2
    assert rewards.num_global_questions(6, 0.2) == 1
    assert rewards.num_global_questions(3, 0.2) == 1  # at least one
    assert rewards.num_global_questions(13, 0.2) == 3  # 2.6 -> 3
    assert rewards.num_global_questions(0, 0.2) == 0
    assert rewards.num_global_questions(4, 1.0) == 4
    with pytest.raises(ValueError, match="global_question_fraction"):
        rewards.num_global_questions(4, 0.0)


def test_global_sample_is_seeded_and_shared_by_a_group():
    seed = rewards.derive_seed(0, "inst-7")
    a = rewards.sample_global_questions(50, 0.2, seed)
    assert a == rewards.sample_global_questions(50, 0.2, rewards.derive_seed(0, "inst-7"))
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10 and all(0 <= i < 50 for i in a)
    others = {
        tuple(rewards.sample_global_questions(50, 0.2, rewards.derive_seed(0, f"inst-{i}")))
        for i in range(20)
    }
    assert len(others) > 15  # different instances get different questions
    assert rewards.sample_global_questions(50, 0.2, rewards.derive_seed(1, "inst-7")) != a


def test_derive_seed_is_stable_across_processes():
    # sha256-based, not Python's randomised hash(): a fixed value
    import hashlib

    expected = int.from_bytes(hashlib.sha256(b"3:abc").digest()[:8], "big") >> 1
    assert rewards.derive_seed(3, "abc") == expected
    assert rewards.derive_seed(3, "abc", step=0) == expected  # outside training: the seed as before
    assert rewards.derive_seed(3, "abc", step=4) == rewards.derive_seed(3, "abc", step=4) != expected
    assert rewards.derive_seed(3, "abc", step=4) != rewards.derive_seed(3, "abc", step=5)


def test_global_sample_is_redrawn_on_each_training_step():
    """A revisited instance is asked a new 20% (issue 12), not the same questions every epoch."""

    def asked(i: int, step: int) -> list[int]:
        return rewards.sample_global_questions(13, 0.2, rewards.derive_seed(7, f"inst-{i}", step))

    assert all(asked(i, 3) == asked(i, 3) for i in range(20))
    assert sum(asked(i, 3) != asked(i, 4) for i in range(20)) > 10


# ------------------------------------------------------------------------ format, compression


def test_format_reward():
    ok, bad = OpResult("insert", True), OpResult("update", False, "unknown id")
    assert rewards.format_reward([ok, bad, ok, ok]) == 0.75
    assert rewards.format_reward([OpResult("invalid", False, "bad json")]) == 0.0
    assert rewards.format_reward([OpResult("skip", True)]) == 1.0
    assert rewards.format_reward([]) == 1.0
    assert rewards.format_reward([OpResult("skip", True)], skip_score=0.0) == 0.0
    assert rewards.is_skip_step([OpResult("skip", True)]) and not rewards.is_skip_step([ok])


def test_compression_reward():
    assert rewards.compression_reward(25, 100) == 0.75
    assert rewards.compression_reward(150, 100) == -0.5  # not clipped
    assert rewards.compression_reward(10, 0) == 0.0


def test_content_reward():
    assert rewards.content_reward([1.0, 0.0, 1.0, 1.0]) == 0.75
    assert rewards.content_reward([]) == 0.0


# ---------------------------------------------------------------------------------- presets


INPUTS = rewards.RewardInputs(
    format=[1.0, 0.5],
    r_global=0.6,
    compression=0.2,
    chunk=[0.8, 0.4],
    eara=[0.1, 0.5],
    content=[1.0, 0.5],
)


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("finemem", [0.1 + 1.0 + 0.5 * 0.8 + 0.05 * 0.2, 0.5 + 0.5 + 0.5 * 0.4 + 0.05 * 0.2]),
        ("outcome_only", [0.6 + 1.0 + 0.01, 0.6 + 0.5 + 0.01]),
        ("csr_only", [0.6 + 1.0 + 0.01 + 0.4, 0.6 + 0.5 + 0.01 + 0.2]),
        ("eara_only", [0.1 + 1.0 + 0.01, 0.5 + 0.5 + 0.01]),
        ("memalpha", [0.6 + 1.0 + 0.01 + 0.1, 0.6 + 0.5 + 0.01 + 0.05]),
    ],
)
def test_presets(preset, expected):
    out = rewards.compose(preset, INPUTS)
    assert out.rewards == pytest.approx(expected)
    assert set(out.components) == set(rewards.preset_components(preset))
    assert all(len(v) == 2 for v in out.components.values())


def test_compose_errors_and_weights():
    with pytest.raises(ValueError, match="choose one of"):
        rewards.compose("grpo", INPUTS)
    with pytest.raises(ValueError, match="needs the 'chunk'"):
        rewards.compose(
            "finemem", rewards.RewardInputs(format=[1.0], r_global=0.0, compression=0.0, eara=[0.0])
        )
    w = rewards.RewardWeights(chunk=1.0, compression=0.0, content=0.0)
    assert rewards.compose("csr_only", INPUTS, w).rewards == pytest.approx([0.6 + 1.0 + 0.8, 0.6 + 0.5 + 0.4])


# ------------------------------------------------------------ scorer, hand-checked end to end


def _hand_episode() -> Episode:
    inst = Instance(
        instance_id="hand-1",
        chunks=["Ann's code is 4821. The sky was grey.", "Bob's dog is Rex."],
        questions=[QAPair("What is Bob's dog called?", ["Rex"])],
        chunk_qa=[
            [QAPair("What is Ann's code?", ["4821"])],
            [QAPair("What is Bob's dog?", ["Rex"]), QAPair("What colour was the sky?", ["grey"])],
        ],
    )
    m1 = MemoryItem("m1", "Ann's code is 4821.", 1)
    m2 = MemoryItem("m2", "Bob's dog is Rex.", 2)
    steps = [
        StepSample(1, [], [], [], "", [OpResult("insert", True, memory_id="m1")], [m1]),
        StepSample(
            2, [], [], [], "",
            [OpResult("insert", True, memory_id="m2"), OpResult("insert", False, "duplicate")],
            [m1, m2],
        ),
    ]  # fmt: skip
    return Episode("hand-1/0", inst, 0, steps)


def test_score_episode_hand_computed():
    cfg = load_config(["retrieval.top_k=1"])
    out = score_episode(_hand_episode(), cfg, EvidenceReader())
    # chunk: step 1 answers Ann's code from [m1] -> 1; step 2: Bob's dog -> 1, the sky -> no evidence -> 0
    assert out.components["chunk"] == [1.0, 0.5]
    # global: the one question retrieves m2 (written at step 2) and scores 1 -> N = [0, 1]
    assert out.global_score == 1.0
    assert [(e.question_index, e.item_ids, e.item_steps, e.score) for e in out.evidence] == [
        (0, ["m2"], [2], 1.0)
    ]
    assert out.components["eara"] == pytest.approx([0.25, 0.75])
    assert out.components["format"] == [1.0, 0.5]
    # memory "[m1] Ann's code is 4821.\n[m2] Bob's dog is Rex." = 10 words; chunks 8 + 4 = 12 words
    assert out.components["compression"] == pytest.approx([1 / 6, 1 / 6])
    comp = 0.05 / 6
    assert out.rewards == pytest.approx([0.25 + 1.0 + 0.5 + comp, 0.75 + 0.5 + 0.25 + comp])
    assert out.stats["eara_no_evidence_share"] == 0.0
    assert out.stats["num_global_questions"] == 1.0
    assert out.stats["memory_tokens"] == 10.0


def test_score_episode_presets_and_token_counter():
    ep = _hand_episode()
    cfg = load_config(["retrieval.top_k=1", "reward=outcome_only"])
    out = score_episode(ep, cfg, EvidenceReader(), count_tokens=lambda s: len(s))
    assert set(out.components) == {"global", "format", "compression"}
    chars = len("[m1] Ann's code is 4821.\n[m2] Bob's dog is Rex.")
    comp = 1 - chars / (len(ep.instance.chunks[0]) + len(ep.instance.chunks[1]))
    assert out.rewards == pytest.approx([1.0 + 1.0 + 0.05 * comp, 1.0 + 0.5 + 0.05 * comp])
    with pytest.raises(ConfigError, match="reward.answerer.kind=openai"):
        score_episode(ep, load_config(["reward=memalpha"]), EvidenceReader())


def test_score_episode_rejects_incomplete_episodes():
    ep = _hand_episode()
    ep.steps = ep.steps[:1]
    with pytest.raises(ValueError, match="1 steps recorded"):
        score_episode(ep, load_config([]), EvidenceReader())
    ep = _hand_episode()
    ep.error = "engine died"
    with pytest.raises(ValueError, match="engine died"):
        score_episode(ep, load_config([]), EvidenceReader())


def _asked_by_scorer(inst: Instance, group_index: int, train_step: int) -> list[int]:
    memory = [MemoryItem(f"m{i + 1}", c, i + 1) for i, c in enumerate(inst.chunks)]
    steps = [StepSample(t + 1, [], [], [], "", [OpResult("skip", True)], memory[: t + 1])
             for t in range(inst.num_steps)]  # fmt: skip
    ep = Episode(f"e{group_index}", inst, group_index, steps, train_step=train_step)
    return [e.question_index for e in score_episode(ep, load_config([]), EvidenceReader()).evidence]


def test_group_rollouts_get_the_same_global_questions():
    from finemem.data.synth import generate_instances

    inst = generate_instances(1, 5)[0]
    inst.questions = inst.questions * 3  # 39 questions -> 8 asked
    for train_step in (0, 3):
        asked = [_asked_by_scorer(inst, g, train_step) for g in range(4)]
        assert len(asked[0]) == 8 and all(a == asked[0] for a in asked)


def test_scorer_draws_the_global_sample_anew_on_each_training_step():
    from finemem.data.synth import generate_instances

    instances = generate_instances(8, 5)
    run_seed = int(load_config([]).run.seed)
    for inst in instances:  # step 0 (evaluation) asks what the instance-only seed asked
        old = rewards.sample_global_questions(len(inst.questions), 0.2, rewards.derive_seed(run_seed, inst.instance_id))
        assert _asked_by_scorer(inst, 0, 0) == old
    at3 = [_asked_by_scorer(inst, 1, 3) for inst in instances]
    assert at3 == [_asked_by_scorer(inst, 2, 3) for inst in instances]  # one group, one step: shared
    assert at3 != [_asked_by_scorer(inst, 1, 4) for inst in instances]  # the next visit: a new draw


def test_episode_train_step_round_trips():
    from finemem.data.synth import generate_instances

    inst = generate_instances(1, 5)[0]
    ep = Episode("e0", inst, 2, [], train_step=9)
    assert Episode.from_dict(ep.to_dict()).train_step == 9
    old_record = {k: v for k, v in ep.to_dict().items() if k != "train_step"}
    assert Episode.from_dict(old_record).train_step == 0
