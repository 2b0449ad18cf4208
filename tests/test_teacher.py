"""Scripted teacher: exact calls on a hand-made instance, each noise knob, and the quality gap
(ideal >> noisy, and selective writes beat storing everything) measured with the real BM25."""

import random
import statistics

import pytest

from finemem.config import SFTConfig
from finemem.data.synth import fact_sentence, generate_instances
from finemem.memory import FlatMemory
from finemem.records import Instance, MemoryItem, QAPair, ToolCall
from finemem.retrieval import retrieve
from finemem.teacher import TeacherNoise, run_teacher_episode, teacher_calls, to_tool_calls

IDEAL = TeacherNoise()
DISTRACTOR = "Mira walked to the park yesterday."


def _rec(kind, sentence, entity=None, attribute=None, value=None):
    return {"sentence": sentence, "kind": kind, "entity": entity, "attribute": attribute, "value": value}


def _tiny_instance() -> Instance:
    """Chunk 1: Mira's pet fact + a distractor. Chunk 2: Mira's pet changes, Bob's car fact."""
    chunk_facts = [
        [_rec("fact", "Mira's pet is parrot.", "Mira", "pet", "parrot"), _rec("distractor", DISTRACTOR)],
        [
            _rec("update", "Mira changed her pet to ferret.", "Mira", "pet", "ferret"),
            _rec("fact", "Bob's car is volvo.", "Bob", "car", "volvo"),
        ],
    ]
    return Instance(
        instance_id="tiny",
        chunks=[" ".join(r["sentence"] for r in c) for c in chunk_facts],
        questions=[QAPair("What is Mira's pet?", ["ferret"])],
        metadata={"chunk_facts": chunk_facts, "seed": 0},
    )


def _final_memory(instance, noise, seed):
    return run_teacher_episode(instance, noise, random.Random(seed))[-1].memory_after


def test_ideal_teacher_exact_calls_on_a_small_instance():
    inst = _tiny_instance()
    steps = run_teacher_episode(inst, IDEAL, random.Random(0))
    assert steps[0].calls == [("memory_insert", {"content": "Mira's pet is parrot."})]
    assert steps[0].memory_before == [] and steps[0].next_id == 1
    assert steps[1].memory_before == [MemoryItem("m1", "Mira's pet is parrot.", 1)]
    assert steps[1].calls == [
        ("memory_update", {"memory_id": "m1", "new_content": "Mira's pet is ferret."}),
        ("memory_insert", {"content": "Bob's car is volvo."}),
    ]
    assert all(r.valid for s in steps for r in s.results)
    assert steps[1].memory_after == [
        MemoryItem("m1", "Mira's pet is ferret.", 2),
        MemoryItem("m2", "Bob's car is volvo.", 2),
    ]


def test_update_without_a_holder_inserts_and_stale_duplicates_are_deleted():
    inst = _tiny_instance()
    assert teacher_calls(FlatMemory(), inst, 2, IDEAL, random.Random(0))[0] == (
        "memory_insert", {"content": "Mira's pet is ferret."})  # fmt: skip
    # two holders of Mira's pet (a noisy history): rewrite the newest, delete the other;
    # an item about another person whose name ends the same way is left alone
    mem = FlatMemory.restore([
        MemoryItem("m1", "Mira's pet is parrot.", 1),
        MemoryItem("m2", "Elmira's pet is gecko.", 1),
        MemoryItem("m3", "Mira's pet is pony. Mira walked to the park yesterday.", 1),
    ])  # fmt: skip
    calls = teacher_calls(mem, inst, 2, IDEAL, random.Random(0))
    assert calls[:2] == [
        ("memory_update", {"memory_id": "m3", "new_content": "Mira's pet is ferret."}),
        ("memory_delete", {"memory_id": "m1"}),
    ]
    assert all(r.valid for r in mem.apply_all(to_tool_calls(calls), 2))
    assert [i.content for i in mem.snapshot()] == [
        "Elmira's pet is gecko.",
        "Mira's pet is ferret.",
        "Bob's car is volvo.",
    ]


def test_each_noise_knob_makes_its_mistake():
    inst = _tiny_instance()
    rng = random.Random(0)
    # miss_fact drops facts and updates alike
    assert [s.calls for s in run_teacher_episode(inst, TeacherNoise(miss_fact=1.0), rng)] == [[], []]
    # store_distractor stores the distractor verbatim as well
    calls = run_teacher_episode(inst, TeacherNoise(store_distractor=1.0), rng)[0].calls
    assert calls == [
        ("memory_insert", {"content": "Mira's pet is parrot."}),
        ("memory_insert", {"content": DISTRACTOR}),
    ]
    # miss_update inserts the new value and leaves the stale item
    final = _final_memory(inst, TeacherNoise(miss_update=1.0), 0)
    assert [i.content for i in final] == [
        "Mira's pet is parrot.",
        "Mira's pet is ferret.",
        "Bob's car is volvo.",
    ]
    # verbose appends a distractor sentence of the chunk (chunk 2 has none, so it stays clean)
    final = _final_memory(inst, TeacherNoise(verbose=1.0), 0)
    assert [i.content for i in final] == ["Mira's pet is ferret.", "Bob's car is volvo."]
    first = run_teacher_episode(inst, TeacherNoise(verbose=1.0), rng)[0].calls
    assert first == [("memory_insert", {"content": f"Mira's pet is parrot. {DISTRACTOR}"})]


def test_noise_from_config_and_validation():
    noise = TeacherNoise.from_sft(SFTConfig())
    assert noise == TeacherNoise(miss_fact=0.35, store_distractor=0.2, miss_update=0.5, verbose=0.1)
    with pytest.raises(ValueError, match="miss_fact"):
        TeacherNoise(miss_fact=1.2)


def test_non_synthetic_instance_and_bad_step_are_clear_errors():
    plain = Instance(instance_id="squad-1", chunks=["a", "b"], questions=[])
    with pytest.raises(ValueError, match="squad-1.*chunk_facts"):
        teacher_calls(FlatMemory(), plain, 1, IDEAL, random.Random(0))
    with pytest.raises(ValueError, match="step 3"):
        teacher_calls(FlatMemory(), _tiny_instance(), 3, IDEAL, random.Random(0))


INSTANCES = generate_instances(50, seed=11)


def test_ideal_memory_holds_exactly_the_latest_canonical_facts_and_answers_every_chunk_qa():
    for inst in INSTANCES:
        steps = run_teacher_episode(inst, IDEAL, random.Random(0))
        assert all(r.valid and r.op != "skip" for s in steps for r in s.results)
        latest = {}
        for step, recs in zip(steps, inst.metadata["chunk_facts"]):
            for r in recs:
                if r["kind"] != "distractor":
                    latest[(r["entity"], r["attribute"])] = fact_sentence(
                        r["entity"], r["attribute"], r["value"]
                    )
            assert sorted(i.content for i in step.memory_after) == sorted(latest.values())
            assert _accuracy(step.memory_after, inst.chunk_qa[step.step - 1]) == 1.0


def test_noisy_teacher_is_deterministic_given_its_rng():
    noise = TeacherNoise.from_sft(SFTConfig())
    a = [s.calls for s in run_teacher_episode(INSTANCES[0], noise, random.Random(4))]
    b = [s.calls for s in run_teacher_episode(INSTANCES[0], noise, random.Random(4))]
    assert a == b


def _accuracy(memory: list[MemoryItem], questions: list[QAPair], k: int = 2) -> float:
    """The CPU evidence reader: a question is right when a gold alias is in its top-k items."""
    right = 0
    for q in questions:
        text = " ".join(item.content for item, _ in retrieve(q.question, memory, k)).lower()
        right += any(a.lower() in text for a in q.answers)
    return right / len(questions)


def _store_everything(inst: Instance) -> list[MemoryItem]:
    mem = FlatMemory()
    for t, recs in enumerate(inst.metadata["chunk_facts"], start=1):
        results = mem.apply_all([ToolCall("memory_insert", {"content": r["sentence"]}) for r in recs], t)
        assert all(r.valid for r in results)
    return mem.snapshot()


def _measure(memories: list[list[MemoryItem]]) -> tuple[float, float]:
    """(global QA accuracy pooled over questions, mean memory size in words)."""
    right = total = 0
    for inst, mem in zip(INSTANCES, memories):
        right += _accuracy(mem, inst.questions) * len(inst.questions)
        total += len(inst.questions)
    return right / total, statistics.mean(sum(len(i.content.split()) for i in mem) for mem in memories)


def test_ideal_teacher_beats_noisy_teacher_and_storing_everything():
    noisy_noise = TeacherNoise.from_sft(SFTConfig())
    ideal_acc, ideal_words = _measure([_final_memory(i, IDEAL, 0) for i in INSTANCES])
    noisy_acc, _ = _measure(
        [
            run_teacher_episode(i, noisy_noise, random.Random(f"noisy/{i.instance_id}"))[-1].memory_after
            for i in INSTANCES
        ]
    )
    all_acc, all_words = _measure([_store_everything(i) for i in INSTANCES])
    assert ideal_acc >= 0.9
    assert noisy_acc <= ideal_acc - 0.15
    # a perfect score needs selective, compact writes
    assert all_acc < ideal_acc or all_words >= 2 * ideal_words
