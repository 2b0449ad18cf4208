"""The reward actor pool: N Ray actors scoring finished episodes in parallel.

Episodes are handed out as actors free up (one in flight per actor, the rest wait in a backlog on
the driver), and results come back in completion order, so a slow episode never holds up the
others (no lock-step batches). Each actor answers through its own request cache
(`reward.answer_cache`), so the rollouts of one group go to one actor where they can: a free actor
takes the oldest episode of a group it already scores, else of a group nobody scores yet, and only
then one of another actor's groups (no actor idles while episodes wait). An actor that dies
(`RayActorError`) is replaced by a fresh one and its episode goes to the front of the backlog:
nothing is lost and nothing is scored twice.
An episode whose scoring raises (e.g. `AnswererUnavailable` once the answerer's retries are
spent) is reported as `EpisodeScoringError` naming the episode, with the original exception (not
Ray's wrapper) in `.cause`; the pool itself stays usable. An answerer endpoint that is down is
ridden out by the answerer's retries inside the actor: the episode is not failed and not re-run.

    pool = RewardPool(cfg, tokenizer_path=cfg.model.path)  # cfg.reward.num_actors actors, policy tokens
    for scored in pool.score_many(episodes):    # ScoredEpisode, as each finishes
        ...
    pool.submit(ep); pool.poll(timeout=0.0)     # streaming use: feed as rollouts finish
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import ray
from ray.exceptions import RayActorError

from finemem.config import FineMemConfig, to_container
from finemem.records import Episode, EvidenceRecord, ScoredEpisode, group_of


class EpisodeScoringError(RuntimeError):
    """Scoring one episode failed inside a reward actor (not an actor death).

    `cause` is the exception the actor raised (`reward.answerers.find_outage` looks there)."""

    def __init__(self, episode_id: str, cause: BaseException) -> None:
        cause = getattr(cause, "cause", None) or cause  # unwrap ray.exceptions.RayTaskError
        text = " ".join(str(cause).split())[:600]
        super().__init__(f"episode {episode_id}: reward scoring failed: {type(cause).__name__}: {text}")
        self.episode_id = episode_id
        self.cause = cause


class RewardPoolError(RuntimeError):
    """An episode killed its actor too many times."""


def policy_token_counter(tokenizer_path: str) -> Callable[[str], int]:
    """count_tokens with the policy's tokenizer, as evaluation counts tokens(M_T) and the chunks.

    Built inside each actor from the tokenizer's folder: the tokenizer is loaded once per actor
    instead of being pickled into every actor (and re-sent with a replacement)."""
    from transformers import AutoTokenizer

    from finemem.prompts import make_token_counter

    return make_token_counter(AutoTokenizer.from_pretrained(tokenizer_path))


def _check_counter_args(count_tokens: Any, tokenizer_path: str | None) -> None:
    if count_tokens is not None and tokenizer_path is not None:
        raise ValueError("reward pool: give count_tokens or tokenizer_path, not both")


class RewardActor:
    """One scoring worker: its own answerer and a persistent event loop (HTTP sessions are reused).

    Token counts (the compression term) use `tokenizer_path`'s tokenizer when given, else
    `count_tokens`, else whitespace words (`reward.scorer`'s default)."""

    def __init__(
        self,
        cfg_dict: dict[str, Any],
        count_tokens: Callable[[str], int] | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        from omegaconf import OmegaConf

        from reward.answer_cache import with_cache
        from reward.answerers import make_answerer
        from reward.scorer import check_answerer_for_preset

        self.cfg = OmegaConf.merge(OmegaConf.structured(FineMemConfig), cfg_dict)
        self.answerer = with_cache(make_answerer(self.cfg.reward.answerer), self.cfg.reward.answerer)
        check_answerer_for_preset(str(self.cfg.reward.preset), self.answerer)
        _check_counter_args(count_tokens, tokenizer_path)
        self.count_tokens = policy_token_counter(tokenizer_path) if tokenizer_path is not None else count_tokens
        self.loop = asyncio.new_event_loop()
        self.scored = 0

    def score(self, episode_dict: dict[str, Any]) -> dict[str, Any]:
        """Score one episode; returns everything of the ScoredEpisode except the episode itself."""
        from reward.scorer import score_episode_async

        episode = Episode.from_dict(episode_dict)
        result = self.loop.run_until_complete(
            score_episode_async(episode, self.cfg, self.answerer, self.count_tokens)
        )
        self.scored += 1
        return {
            "rewards": result.rewards,
            "components": result.components,
            "evidence": [e.to_dict() for e in result.evidence],
            "global_score": result.global_score,
            "stats": result.stats,
        }

    def metrics(self) -> dict[str, float]:
        return {"episodes_scored": float(self.scored), **self.answerer.metrics()}

    def ready(self) -> bool:
        return True


def scoring_payload(episode: Episode) -> dict[str, Any]:
    """The episode as a record holding only what scoring reads (`Episode.from_dict` accepts it).

    Token ids and logprobs stay on the driver: they are most of an episode's bytes, and
    `StepSample.to_dict` (dataclasses.asdict) copies them element by element, which measured
    ~26 ms per 8-step episode, more than scoring it."""
    return {
        "episode_id": episode.episode_id,
        "instance": episode.instance.to_dict(),
        "group_index": episode.group_index,
        "error": episode.error,
        "train_step": episode.train_step,  # seeds the global-question sample
        "steps": [
            {
                "step": s.step,
                "prompt_ids": [],
                "response_ids": [],
                "logprobs": [],
                "response_text": "",
                "ops": [
                    {"op": o.op, "valid": o.valid, "reason": o.reason, "memory_id": o.memory_id}
                    for o in s.ops
                ],
                "memory": [{"id": m.id, "content": m.content, "step": m.step} for m in s.memory],
            }
            for s in episode.steps
        ],
    }


def pick_episode(groups: list[str], homes: dict[str, int], slot: int) -> int:
    """Which backlog entry (given as its episodes' groups, oldest first) the actor in `slot` takes:
    the oldest of a group homed at `slot`, else of a group with no home, else the oldest of all."""
    unhomed = None
    for i, group in enumerate(groups):
        home = homes.get(group)
        if home == slot:
            return i
        if home is None and unhomed is None:
            unhomed = i
    return 0 if unhomed is None else unhomed


def _scored(episode: Episode, out: dict[str, Any]) -> ScoredEpisode:
    return ScoredEpisode(
        episode=episode,
        rewards=list(out["rewards"]),
        components={k: list(v) for k, v in out["components"].items()},
        evidence=[EvidenceRecord.from_dict(e) for e in out["evidence"]],
        global_score=float(out["global_score"]),
        stats=dict(out["stats"]),
    )


class RewardPool:
    """N `RewardActor`s fed as they free up; see the module docstring.

    Training passes `tokenizer_path=cfg.model.path` so the compression term counts policy tokens, as
    evaluation does; `count_tokens` (a picklable callable) is the alternative, and with neither the
    actors count whitespace words."""

    def __init__(
        self,
        cfg: Any,
        num_actors: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
        max_attempts: int = 3,
        tokenizer_path: str | None = None,
    ) -> None:
        n = int(num_actors if num_actors is not None else cfg.reward.num_actors)
        if n < 1:
            raise ValueError(f"reward pool needs at least one actor, got num_actors={n}")
        from reward.answerers import make_answerer
        from reward.scorer import check_answerer_for_preset

        # fail on the driver, with the config error, rather than as actors dying in their constructor
        check_answerer_for_preset(str(cfg.reward.preset), make_answerer(cfg.reward.answerer))
        _check_counter_args(count_tokens, tokenizer_path)
        self._cfg_dict = to_container(cfg)
        self._count_tokens = count_tokens
        self._tokenizer_path = None if tokenizer_path is None else str(tokenizer_path)
        self._actor_cls = ray.remote(num_cpus=float(cfg.reward.actor_num_cpus), max_restarts=0)(RewardActor)
        self.max_attempts = max_attempts
        self.actors: list[Any] = [self._new_actor() for _ in range(n)]
        self._idle: deque[Any] = deque(self.actors)
        self._backlog: deque[Episode] = deque()
        self._inflight: dict[Any, tuple[Any, Episode]] = {}
        self._homes: dict[str, int] = {}  # group -> the actor slot scoring it (see pick_episode)
        self._deaths: Counter[str] = Counter()
        self.actors_replaced = 0
        self.episodes_scored = 0

    def _new_actor(self):
        return self._actor_cls.remote(self._cfg_dict, self._count_tokens, self._tokenizer_path)

    def wait_ready(self) -> None:
        """Block until every actor is constructed (for timing; scoring does not need it)."""
        ray.get([a.ready.remote() for a in self.actors])

    @property
    def pending(self) -> int:
        """Episodes submitted but not yet returned (in flight or in the backlog)."""
        return len(self._backlog) + len(self._inflight)

    def submit(self, episode: Episode) -> None:
        """Queue one finished episode; it starts as soon as an actor is free."""
        self._backlog.append(episode)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._backlog:
            actor = self._idle.popleft()
            slot = self.actors.index(actor)
            i = pick_episode([group_of(e.episode_id) for e in self._backlog], self._homes, slot)
            episode = self._backlog[i]
            del self._backlog[i]
            group = group_of(episode.episode_id)
            self._homes.setdefault(group, slot)
            if len(self._homes) > 4096:  # old groups are done: forget the oldest homes
                del self._homes[next(iter(self._homes))]
            self._inflight[actor.score.remote(scoring_payload(episode))] = (actor, episode)

    def _replace(self, dead) -> Any:
        ray.kill(dead, no_restart=True)  # a no-op for an actor that is already gone
        fresh = self._new_actor()
        self.actors[self.actors.index(dead)] = fresh
        self.actors_replaced += 1
        return fresh

    def _collect(self, ref) -> ScoredEpisode | None:
        """Turn one finished task into a result (or a re-queued episode after an actor death)."""
        actor, episode = self._inflight.pop(ref)
        try:
            out = ray.get(ref)
        except RayActorError as e:
            self._idle.append(self._replace(actor))
            self._deaths[episode.episode_id] += 1
            if self._deaths[episode.episode_id] >= self.max_attempts:
                raise RewardPoolError(
                    f"episode {episode.episode_id}: its reward actor died {self.max_attempts} times; "
                    f"last: {e}"
                ) from e
            self._backlog.appendleft(episode)
            return None
        except Exception as e:  # the task raised: the actor is fine, the episode is not
            self._idle.append(actor)
            raise EpisodeScoringError(episode.episode_id, e) from e
        self._idle.append(actor)
        self.episodes_scored += 1
        return _scored(episode, out)

    def poll(self, timeout: float | None = 0.0) -> list[ScoredEpisode]:
        """Results that are ready within `timeout` seconds (None: wait for at least one)."""
        self._dispatch()
        if not self._inflight:
            return []
        refs = list(self._inflight)
        num = 1 if timeout is None else len(refs)
        ready, _ = ray.wait(refs, num_returns=num, timeout=timeout)
        out = []
        for ref in ready:
            scored = self._collect(ref)
            if scored is not None:
                out.append(scored)
        self._dispatch()
        return out

    def results(self) -> Iterator[ScoredEpisode]:
        """Every submitted episode's result, in completion order, until none is pending."""
        while self.pending:
            yield from self.poll(timeout=None)

    def score_many(self, episodes: Iterable[Episode], backlog: int = 2) -> Iterator[ScoredEpisode]:
        """Score `episodes` (read lazily), yielding each ScoredEpisode as it finishes."""
        source = iter(episodes)
        exhausted = False
        while True:
            while not exhausted and len(self._backlog) < backlog + len(self._idle):
                try:
                    self.submit(next(source))
                except StopIteration:
                    exhausted = True
            if not self.pending:
                return
            yield from self.poll(timeout=None)

    def metrics(self) -> dict[str, float]:
        """Summed answerer metrics of the live actors, plus the pool's own counters."""
        total: Counter[str] = Counter()
        for m in ray.get([a.metrics.remote() for a in self.actors]):
            for k, v in m.items():
                if not k.endswith("_max_s") and not k.endswith("_mean_s"):
                    total[k] += v
        return {
            **{k: float(v) for k, v in total.items()},
            "actors_replaced": float(self.actors_replaced),
            "pool_episodes_scored": float(self.episodes_scored),
        }

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []
        self._idle.clear()
