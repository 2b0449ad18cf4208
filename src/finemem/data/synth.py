"""Seeded synthetic memory tasks (spec section 6): the dataset the CPU demo trains and evaluates on.

An instance is a short stream of chunks about a few people. Each chunk mixes
- facts, always in the canonical form "{Name}'s {attribute} is {value}." (the form the ideal
  teacher stores, so a tiny policy learns to copy them),
- updates of a fact from an earlier chunk ("{Name} changed her pet to ferret."), after which the
  old value is wrong (the teacher rewrites the stored item to the canonical form), and
- distractors that are never asked about but share words with the questions (names, attribute
  words, even a value of the right kind), so storing them costs memory and retrieval precision.

Global questions ask about the latest value of `synth_questions_per_instance` of the instance's
(entity, attribute) pairs, as MemoryAgentBench's FactConsolidation does (the task is conflict
resolution): first one pair per chunk (one whose latest value that chunk writes, an updated one if
any), so every chunk holds an answer, then the other updated pairs, then the rest. The planner keeps
at least that many distinct pairs, so the reward's 20% global sample (3 of the default 13) is never
a single coin flip. Chunk QA asks about the facts and updates of one chunk, with the value as of
that chunk.
`metadata["chunk_facts"]` keeps the structured truth per chunk for the scripted teacher.

Vocabulary rules (checked by tests): ASCII only; no value is a substring of any other word the
generator writes (names, attributes, template words, other values), so "gold string in retrieved
text" is true exactly when the stored item carries that value; distractors only use values that no
fact of the same instance uses. Everything is drawn from one `random.Random` per instance, seeded by
(seed, index), so `generate_instances(n, seed)` is deterministic and a prefix of a longer run.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from finemem.config import ConfigError, DataConfig
from finemem.data.readers import write_jsonl
from finemem.records import Instance, QAPair

FEMALE_NAMES = (
    "Alice", "Bella", "Clara", "Diana", "Emma", "Fiona", "Grace", "Hannah", "Irene", "Julia",
    "Karen", "Laura", "Megan", "Nora", "Olivia", "Paula", "Rachel", "Sarah", "Tina", "Vera",
    "Wendy", "Zoe", "Helen", "Lucy", "Molly", "Nancy", "Ruby", "Sophie", "Carol", "Agnes",
)  # fmt: skip
MALE_NAMES = (
    "Adam", "Brian", "Carl", "David", "Edward", "Frank", "George", "Henry", "Isaac", "Jack",
    "Kevin", "Louis", "Martin", "Nathan", "Peter", "Robert", "Samuel", "Thomas", "Walter", "Arthur",
    "Felix", "Oliver", "Simon", "Owen", "Ryan", "Gordon", "Harold", "Milton", "Dennis", "Wallace",
)  # fmt: skip
NAMES = FEMALE_NAMES + MALE_NAMES
PRONOUN = {**{n: "her" for n in FEMALE_NAMES}, **{n: "his" for n in MALE_NAMES}}

LUCKY_NUMBERS = ("13", "17", "21", "24", "28", "32", "36", "41", "45", "49", "53", "58",
                 "62", "67", "71", "76", "83", "88", "92", "97")  # fmt: skip

# attribute -> the values it can take (short single words, or two-digit numbers)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "locker code": ("alpha", "bravo", "delta", "echo", "foxtrot", "kilo", "quebec", "sierra", "tango",
                    "yankee", "zulu", "whiskey", "november", "romeo"),
    "favorite color": ("blue", "green", "pink", "purple", "yellow", "black", "white", "silver", "crimson",
                       "teal", "indigo", "maroon", "beige", "ivory", "navy", "scarlet", "lilac", "magenta",
                       "turquoise", "lavender"),
    "pet": ("parrot", "hamster", "rabbit", "turtle", "goldfish", "ferret", "lizard", "pony", "iguana",
            "gecko", "canary", "beagle", "poodle", "kitten", "puppy", "snake", "frog", "tortoise"),
    "home city": ("boston", "denver", "dallas", "seattle", "chicago", "phoenix", "portland", "miami",
                  "atlanta", "houston", "detroit", "memphis", "omaha", "tulsa", "raleigh", "tampa",
                  "orlando", "toledo", "fresno"),
    "job": ("nurse", "pilot", "baker", "lawyer", "chef", "farmer", "dentist", "plumber", "teacher",
            "painter", "barber", "tailor", "architect", "librarian", "mechanic", "surgeon", "journalist",
            "carpenter"),
    "car": ("toyota", "honda", "volvo", "tesla", "subaru", "mazda", "jeep", "audi", "nissan", "fiat",
            "lexus", "buick", "porsche", "ferrari", "jaguar", "hyundai", "chevy"),
    "sport": ("tennis", "soccer", "hockey", "rugby", "cricket", "golf", "baseball", "basketball",
              "volleyball", "badminton", "swimming", "cycling", "rowing", "boxing", "fencing", "skiing",
              "surfing", "karate", "judo"),
    "instrument": ("piano", "violin", "cello", "flute", "guitar", "drums", "harp", "trumpet", "banjo",
                   "clarinet", "saxophone", "ukulele", "oboe", "tuba", "accordion", "harmonica"),
    "lucky number": LUCKY_NUMBERS,
    "favorite food": ("pizza", "sushi", "tacos", "pasta", "curry", "ramen", "lasagna", "burritos",
                      "pancakes", "waffles", "dumplings", "noodles", "steak", "salad", "omelette", "soup",
                      "pretzels"),
    "team": ("eagles", "tigers", "sharks", "wolves", "panthers", "hornets", "ravens", "lions", "rockets",
             "comets", "pirates", "giants", "falcons", "bulldogs", "jets"),
    "favorite fruit": ("mango", "papaya", "cherry", "banana", "kiwi", "peach", "apricot", "lychee", "guava",
                       "melon", "grape", "coconut", "pineapple", "lemon"),
}  # fmt: skip

PLACES = ("park", "museum", "harbor", "market", "station", "library", "beach", "cinema", "pharmacy",
          "bank", "gym", "zoo", "airport", "bookstore", "bridge")  # fmt: skip

FACT_TEMPLATE = "{name}'s {attribute} is {value}."
UPDATE_TEMPLATES = (
    "{name} changed {pronoun} {attribute} to {value}.",
    "{name}'s {attribute} is now {value}.",
    "{name} switched {pronoun} {attribute} to {value}.",
    "{name} updated {pronoun} {attribute} to {value}.",
)
# {other} is another person of the instance; {foreign} a value of {attribute}'s kind that no fact
# of the instance uses, so a stored distractor never carries a gold answer.
DISTRACTOR_TEMPLATES = (
    "{name} talked about the {attribute} of a friend.",
    "{name} walked to the {place} yesterday.",
    "{name} heard that a cousin's {attribute} is {foreign}.",
    "{name} and {other} met at the {place}.",
    "{name}'s neighbor once mentioned {foreign}.",
    "{name} asked {other} about the {attribute} at lunch.",
)
# Used for global questions (one drawn at random) and chunk QA (distinct ones per fact).
QUESTION_TEMPLATES = (
    "What is {name}'s {attribute}?",
    "What {attribute} does {name} have?",
    "Which {attribute} belongs to {name}?",
    "Tell me the {attribute} of {name}.",
    "What is the current {attribute} of {name}?",
    "{name} has which {attribute}?",
)
ENTITIES_PER_INSTANCE = (3, 5)

_UNITS = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen")  # fmt: skip


def number_words(n: int) -> str:
    """English words for 10..99 ("forty-two"), the alias of a two-digit value."""
    if not 10 <= n <= 99:
        raise ValueError(f"number_words covers 10..99, got {n}")
    if n < 20:
        return _TEENS[n - 10]
    return _TENS[n // 10] + ("-" + _UNITS[n % 10] if n % 10 else "")


def gold_aliases(value: str) -> list[str]:
    """Every acceptable answer for a value: the value itself, plus the words of a number."""
    return [value, number_words(int(value))] if value.isdigit() else [value]


def fact_sentence(entity: str, attribute: str, value: str) -> str:
    """The canonical sentence of a fact; the ideal teacher stores exactly this."""
    return FACT_TEMPLATE.format(name=entity, attribute=attribute, value=value)


def fact_prefix(entity: str, attribute: str) -> str:
    """The start of the canonical sentence, shared by every value of (entity, attribute)."""
    return f"{entity}'s {attribute} is "


@dataclass
class _Event:
    """One fact-bearing sentence before it is rendered: a new fact or an update of an older one."""

    kind: str  # "fact" | "update"
    entity: str
    attribute: str
    value: str


def _check_config(cfg: DataConfig) -> None:
    """Refuse knob values the generator cannot honour, naming the knob (ConfigError is a ValueError)."""
    problems = []
    if cfg.synth_min_chunks < 1:
        problems.append(f"data.synth_min_chunks must be >= 1, got {cfg.synth_min_chunks}")
    if cfg.synth_max_chunks < cfg.synth_min_chunks:
        problems.append(
            f"data.synth_max_chunks ({cfg.synth_max_chunks}) must be >= data.synth_min_chunks "
            f"({cfg.synth_min_chunks})"
        )
    if cfg.synth_facts_per_chunk < 1:
        problems.append(f"data.synth_facts_per_chunk must be >= 1, got {cfg.synth_facts_per_chunk}")
    if cfg.synth_distractors_per_chunk < 0:
        problems.append(
            f"data.synth_distractors_per_chunk must be >= 0, got {cfg.synth_distractors_per_chunk}"
        )
    if not 0.0 <= cfg.synth_update_prob <= 1.0:
        problems.append(f"data.synth_update_prob must be in [0, 1], got {cfg.synth_update_prob}")
    if cfg.synth_questions_per_instance < 1:
        problems.append(
            f"data.synth_questions_per_instance must be >= 1, got {cfg.synth_questions_per_instance}"
        )
    if cfg.chunk_qa_per_chunk < 0:
        problems.append(f"data.chunk_qa_per_chunk must be >= 0, got {cfg.chunk_qa_per_chunk}")
    if cfg.synth_min_chunks * cfg.synth_facts_per_chunk < cfg.synth_questions_per_instance:
        problems.append(
            f"data.synth_questions_per_instance ({cfg.synth_questions_per_instance}) needs as many distinct "
            f"facts, but data.synth_min_chunks * data.synth_facts_per_chunk = {cfg.synth_min_chunks} * "
            f"{cfg.synth_facts_per_chunk} = {cfg.synth_min_chunks * cfg.synth_facts_per_chunk}: raise those "
            "or lower data.synth_questions_per_instance"
        )
    most_pairs = ENTITIES_PER_INSTANCE[0] * len(ATTRIBUTES)
    if cfg.synth_questions_per_instance > most_pairs:
        problems.append(
            f"data.synth_questions_per_instance must be <= {most_pairs} (the distinct facts of "
            f"{ENTITIES_PER_INSTANCE[0]} people x {len(ATTRIBUTES)} attributes), "
            f"got {cfg.synth_questions_per_instance}"
        )
    if problems:
        raise ConfigError("synthetic data config: " + "; ".join(problems))


def _plan_events(
    rng: random.Random, entities: list[str], num_chunks: int, cfg: DataConfig
) -> list[list[_Event]]:
    """Facts and updates per chunk: each (entity, attribute) starts once; updates change a value
    written in an earlier chunk to one it never had.

    Every fact slot from chunk 2 on is an update with probability `synth_update_prob`, but at most
    `slots - synth_questions_per_instance` of them are (a uniform subset of the drawn ones), so the
    instance keeps at least `synth_questions_per_instance` distinct pairs to ask about; drawing the
    update slots up front keeps updates spread over the stream instead of spending the budget early.
    """
    per_chunk = cfg.synth_facts_per_chunk
    slots = num_chunks * per_chunk
    drawn = [s for s in range(per_chunk, slots) if rng.random() < cfg.synth_update_prob]
    budget = max(0, slots - cfg.synth_questions_per_instance)
    update_slots = set(rng.sample(drawn, min(budget, len(drawn))))
    history: dict[tuple[str, str], list[str]] = {}  # pair -> values in order
    last_chunk: dict[tuple[str, str], int] = {}
    unused = [(e, a) for e in entities for a in ATTRIBUTES]
    plan: list[list[_Event]] = []
    for c in range(num_chunks):
        events: list[_Event] = []
        touched: set[tuple[str, str]] = set()
        for i in range(per_chunk):
            eligible = [p for p in history if last_chunk[p] < c and p not in touched]
            eligible = [p for p in eligible if len(history[p]) < len(ATTRIBUTES[p[1]])]
            if eligible and (not unused or c * per_chunk + i in update_slots):
                pair = rng.choice(eligible)
                value = rng.choice([v for v in ATTRIBUTES[pair[1]] if v not in history[pair]])
                kind = "update"
            elif unused:
                pair = unused.pop(rng.randrange(len(unused)))
                value = rng.choice(ATTRIBUTES[pair[1]])
                history[pair] = []
                kind = "fact"
            else:
                raise ConfigError(
                    f"data.synth_facts_per_chunk={cfg.synth_facts_per_chunk}: too many facts for "
                    f"{len(entities)} people x {len(ATTRIBUTES)} attributes"
                )
            history[pair].append(value)
            last_chunk[pair] = c
            touched.add(pair)
            events.append(_Event(kind, pair[0], pair[1], value))
        plan.append(events)
    return plan


def _distractor(rng: random.Random, entities: list[str], used_values: set[str]) -> str:
    template = rng.choice(DISTRACTOR_TEMPLATES)
    name = rng.choice(entities)
    attribute = rng.choice(list(ATTRIBUTES))
    foreign = [v for v in ATTRIBUTES[attribute] if v not in used_values]
    return template.format(
        name=name,
        other=rng.choice([e for e in entities if e != name]),
        attribute=attribute,
        place=rng.choice(PLACES),
        foreign=rng.choice(foreign) if foreign else rng.choice(PLACES),
    )


def _questions_for(rng: random.Random, entity: str, attribute: str, count: int) -> list[str]:
    """`count` distinct paraphrases of the question about (entity, attribute)."""
    templates = rng.sample(QUESTION_TEMPLATES, min(count, len(QUESTION_TEMPLATES)))
    return [t.format(name=entity, attribute=attribute) for t in templates]


def _chunk_qa(rng: random.Random, events: list[_Event], k: int) -> list[QAPair]:
    """K questions about a chunk's facts, round-robin over facts, each fact's paraphrases distinct."""
    per_fact = [_questions_for(rng, ev.entity, ev.attribute, -(-k // len(events))) for ev in events]
    out: list[QAPair] = []
    seen: set[str] = set()
    for j in range(k):
        ev, paraphrases = events[j % len(events)], per_fact[j % len(events)]
        if j // len(events) >= len(paraphrases):
            break
        q = paraphrases[j // len(events)]
        if q not in seen:
            seen.add(q)
            out.append(QAPair(q, gold_aliases(ev.value)))
    return out


def _select_asked(rng: random.Random, plan: list[list[_Event]], count: int) -> list[tuple[str, str]]:
    """The (entity, attribute) pairs the global questions ask about, in question order.

    First one pair per chunk, among those whose latest value that chunk writes (an updated pair if
    there is one; any pair the chunk touches when later chunks superseded all of them), so every
    chunk carries an answer; then the remaining updated pairs (conflict resolution); then the rest.
    """
    latest_chunk: dict[tuple[str, str], int] = {}
    updated: set[tuple[str, str]] = set()
    for c, events in enumerate(plan):
        for ev in events:
            latest_chunk[(ev.entity, ev.attribute)] = c
            if ev.kind == "update":
                updated.add((ev.entity, ev.attribute))
    asked: list[tuple[str, str]] = []
    for c, events in enumerate(plan):
        if any(latest_chunk[p] == c for p in asked):
            continue
        touched = [(ev.entity, ev.attribute) for ev in events if (ev.entity, ev.attribute) not in asked]
        here = [p for p in touched if latest_chunk[p] == c] or touched
        if here:
            asked.append(rng.choice([p for p in here if p in updated] or here))
    rest_updated = [p for p in latest_chunk if p in updated and p not in asked]
    rest_others = [p for p in latest_chunk if p not in updated and p not in asked]
    rng.shuffle(rest_updated)
    rng.shuffle(rest_others)
    asked = (asked + rest_updated + rest_others)[:count]
    rng.shuffle(asked)
    return asked


def generate_instance(seed: int, index: int, cfg: DataConfig | None = None) -> Instance:
    """Instance `index` of the stream seeded by `seed` (independent of the other indices)."""
    cfg = cfg if cfg is not None else DataConfig()
    _check_config(cfg)
    rng = random.Random(f"finemem-synth/{seed}/{index}")
    num_chunks = rng.randint(cfg.synth_min_chunks, cfg.synth_max_chunks)
    entities = rng.sample(NAMES, rng.randint(*ENTITIES_PER_INSTANCE))
    plan = _plan_events(rng, entities, num_chunks, cfg)
    used_values = {ev.value for events in plan for ev in events}

    chunks: list[str] = []
    chunk_facts: list[list[dict]] = []
    chunk_qa: list[list[QAPair]] = []
    seen_distractors: set[str] = set()
    for events in plan:
        records = []
        for ev in events:
            if ev.kind == "fact":
                sentence = fact_sentence(ev.entity, ev.attribute, ev.value)
            else:
                sentence = rng.choice(UPDATE_TEMPLATES).format(
                    name=ev.entity, pronoun=PRONOUN[ev.entity], attribute=ev.attribute, value=ev.value
                )
            records.append(
                {"sentence": sentence, "kind": ev.kind, "entity": ev.entity, "attribute": ev.attribute,
                 "value": ev.value}
            )  # fmt: skip
        for _ in range(cfg.synth_distractors_per_chunk):
            sentence = _distractor(rng, entities, used_values)
            for _retry in range(20):
                if sentence not in seen_distractors:
                    break
                sentence = _distractor(rng, entities, used_values)
            seen_distractors.add(sentence)
            records.append(
                {"sentence": sentence, "kind": "distractor", "entity": None, "attribute": None, "value": None}
            )
        rng.shuffle(records)
        # One sentence per line: a sentence-initial name then tokenises exactly as it does inside a
        # tool call's JSON string ("Kevin", not " Kevin"), so writing a fact is a plain token copy.
        chunks.append("\n".join(r["sentence"] for r in records))
        chunk_facts.append(records)
        chunk_qa.append(_chunk_qa(rng, events, cfg.chunk_qa_per_chunk) if cfg.chunk_qa_per_chunk else [])

    latest: dict[tuple[str, str], str] = {}
    for events in plan:
        for ev in events:
            latest[(ev.entity, ev.attribute)] = ev.value
    asked = _select_asked(rng, plan, cfg.synth_questions_per_instance)
    updated = {(ev.entity, ev.attribute) for events in plan for ev in events if ev.kind == "update"}
    questions = [
        QAPair(rng.choice(QUESTION_TEMPLATES).format(name=e, attribute=a), gold_aliases(latest[(e, a)]))
        for e, a in asked
    ]
    return Instance(
        instance_id=f"synth-{seed}-{index}",
        chunks=chunks,
        questions=questions,
        chunk_qa=chunk_qa,
        data_source="synthetic",
        competency="conflict_resolution" if updated else "accurate_retrieval",
        metadata={
            "seed": seed,
            "index": index,
            "chunk_facts": chunk_facts,
            "question_facts": [{"entity": e, "attribute": a, "value": latest[(e, a)]} for e, a in asked],
        },
    )


def generate_instances(n: int, seed: int, cfg: DataConfig | None = None) -> list[Instance]:
    """`n` synthetic instances; a pure function of (n, seed, cfg: DataConfig | None = defaults)."""
    if n < 0:
        raise ValueError(f"number of instances must be >= 0, got {n}")
    return [generate_instance(seed, i, cfg) for i in range(n)]


def cli(argv: list[str]) -> int:
    """`finemem data synth --out PATH [--instances N] [--seed S] [key=value ...]`."""
    from finemem.cli import parse_command
    from finemem.config import load_config

    parser = argparse.ArgumentParser(prog="finemem data synth", description=cli.__doc__)
    parser.add_argument("--out", required=True, help="jsonl file to write")
    parser.add_argument("--instances", type=int, default=None, help="default: data.synth_train_instances")
    parser.add_argument("--seed", type=int, default=None, help="default: data.synth_train_seed")
    args, overrides = parse_command(parser, argv)
    data_cfg = load_config(overrides).data
    n = data_cfg.synth_train_instances if args.instances is None else args.instances
    seed = data_cfg.synth_train_seed if args.seed is None else args.seed
    instances = generate_instances(n, seed, data_cfg)
    write_jsonl(instances, args.out)
    updates = sum(
        r["kind"] == "update" for inst in instances for c in inst.metadata["chunk_facts"] for r in c
    )
    print(
        f"wrote {len(instances)} synthetic instances (seed {seed}) to {args.out}: "
        f"{sum(i.num_steps for i in instances)} chunks, {sum(len(i.questions) for i in instances)} questions, "
        f"{updates} updates"
    )
    return 0
