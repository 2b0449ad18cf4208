"""Fault: the answerer endpoint goes down mid-run (the real local OpenAI test server is stopped,
later started again on the same port).

- Back within the retry budget: the request is retried (connection refused is retryable) and
  answers; nothing fails, nothing scores 0.
- Down past the budget: `AnswererUnavailable` naming the endpoint and the `reward.answerer.*`
  retry keys; `outage_message` is the one line the trainer stops with.
- `reward.answerer.failure_scores_zero=true`: those questions score 0, the episode is scored and
  the failures are counted.

The pool tests start Ray (heavy):
`flock /tmp/finemem-heavy.lock .venv/bin/python -m pytest tests/test_faults_answerer.py`.
"""

from __future__ import annotations

import asyncio
import pickle
import time

import pytest

from finemem.config import AnswererConfig, load_config
from finemem.records import MemoryItem
from reward.answerers import (
    AnswererError,
    AnswererUnavailable,
    OpenAIChatAnswerer,
    find_outage,
    make_answerer,
    outage_message,
)
from reward.openai_test_server import OpenAITestServer
from reward.scorer import score_episode

EVIDENCE = [MemoryItem("m1", "Mira's locker code is 4821.", 1)]
QUESTION = "What is Mira's locker code?"


class Endpoint:
    """The test server on a fixed port that can be stopped and started again (a restart)."""

    def __init__(self) -> None:
        self.server = OpenAITestServer().start()
        self.port = self.server.port
        self.base_url = self.server.base_url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        self.stop()
        self.server = OpenAITestServer(port=self.port).start()


@pytest.fixture
def endpoint():
    ep = Endpoint()
    yield ep
    ep.stop()


def _client(url: str, **kw) -> OpenAIChatAnswerer:
    return OpenAIChatAnswerer(AnswererConfig(kind="openai", base_url=url, model="test-model", **kw))


# ---- answerer level (real HTTP, no Ray) ---------------------------------------------------------
def test_endpoint_restart_within_the_retry_budget_loses_nothing(endpoint):
    a = _client(endpoint.base_url, max_retries=8, backoff_s=0.05)
    assert a.retry_budget_s() > 3.0

    async def go():
        # No request before the stop: OpenAITestServer.stop() closes the listening socket but keeps
        # serving connections already open (keep-alive), which a real server restart would reset.
        endpoint.stop()
        task = asyncio.ensure_future(a.answer(QUESTION, EVIDENCE, episode_id="ep-1"))
        while a.metrics().get("error_connection", 0) < 1:  # the client has met the outage
            assert not task.done(), task
            await asyncio.sleep(0.01)
        endpoint.restart()
        try:
            return await task
        finally:
            await a.close()

    assert "4821" in asyncio.run(go())
    m = a.metrics()
    assert m["error_connection"] >= 1 and m["retries"] >= 1
    assert m["failures"] == 0 and m["successes"] == 1
    assert len(endpoint.server.requests) == 1  # the restarted server answered the retried request


def test_endpoint_down_past_the_budget_names_endpoint_and_retry_keys(endpoint):
    endpoint.stop()
    a = _client(endpoint.base_url, max_retries=2, backoff_s=0.01)

    async def go():
        try:
            return await a.answer(QUESTION, EVIDENCE, episode_id="ep-7")
        finally:
            await a.close()

    with pytest.raises(AnswererUnavailable) as info:
        asyncio.run(go())
    err = info.value
    assert isinstance(err, AnswererError)  # the scorer's failure_scores_zero path catches it
    assert err.endpoint == endpoint.base_url and err.episode_id == "ep-7" and err.attempts == 3
    text = str(err)
    assert "episode ep-7" in text and "failed after 3 attempts" in text and "connection" in text
    assert "reward.answerer.max_retries=2" in text and "reward.answerer.backoff_s=0.01" in text
    line = outage_message(RuntimeError("producer failed"))
    assert line is None  # only an outage is turned into the stop line
    wrapped = RuntimeError("rollout/reward producer failed")
    wrapped.__cause__ = err
    line = outage_message(wrapped)
    assert "\n" not in line and endpoint.base_url in line
    assert "reward.answerer.max_retries" in line and "reward.answerer.failure_scores_zero=true" in line


def test_non_retryable_errors_are_not_an_outage(endpoint):
    endpoint.server.fail(5, status=401)
    a = _client(endpoint.base_url, max_retries=3, backoff_s=0.01)

    async def go():
        try:
            return await a.answer(QUESTION, EVIDENCE, episode_id="e")
        finally:
            await a.close()

    with pytest.raises(AnswererError) as info:
        asyncio.run(go())
    assert not isinstance(info.value, AnswererUnavailable) and find_outage(info.value) is None


def test_backoff_doubles_and_is_capped():
    a = _client("http://127.0.0.1:9/v1", max_retries=8, backoff_s=1.0)
    assert [a.backoff(r) for r in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]  # BACKOFF_MAX_S
    assert a.retry_budget_s() == 121.0
    assert _client("http://127.0.0.1:9/v1", max_retries=0).retry_budget_s() == 0.0


def test_outage_error_survives_pickling_with_its_class_and_fields():
    err = AnswererUnavailable("x failed after 5 attempts", "ep-3", 5, endpoint="http://h:1/v1", waited_s=2.5)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is AnswererUnavailable and str(back) == str(err)
    assert (back.episode_id, back.attempts, back.endpoint, back.waited_s) == ("ep-3", 5, "http://h:1/v1", 2.5)


def test_scorer_scores_zero_and_counts_while_down_only_when_configured(endpoint):
    from test_answerers import _episode

    endpoint.stop()
    base = [f"reward.answerer.base_url={endpoint.base_url}", "reward.answerer.kind=openai",
            "reward.answerer.model=test-model", "reward.answerer.max_retries=1", "reward.answerer.backoff_s=0.01"]
    cfg = load_config(base)
    with pytest.raises(AnswererUnavailable):
        score_episode(_episode(), cfg, make_answerer(cfg.reward.answerer))
    cfg = load_config([*base, "reward.answerer.failure_scores_zero=true"])
    out = score_episode(_episode(), cfg, make_answerer(cfg.reward.answerer))
    assert out.global_score == 0.0 and out.components["chunk"] == [0.0, 0.0]
    assert out.stats["answer_failures"] == out.stats["answers"] == 3.0


# ---- reward pool level (real Ray actors, real HTTP) ----------------------------------------------


def _pool_cfg(url: str, *extra: str):
    return load_config([f"reward.answerer.base_url={url}", "reward.answerer.kind=openai",
                        "reward.answerer.model=test-model", "reward.actor_num_cpus=0.1", *extra])


@pytest.mark.heavy
def test_pool_rides_out_an_endpoint_restart(ray_local, endpoint):
    from test_reward_pool import teacher_episodes

    from reward.pool import RewardPool

    episodes = teacher_episodes(4, seed=11)
    # budget 0.25 + 0.5 + 1 + 2 + 4 + 8 s: far more than the outage below
    cfg = _pool_cfg(endpoint.base_url, "reward.answerer.max_retries=6", "reward.answerer.backoff_s=0.25")
    pool = RewardPool(cfg, num_actors=2)
    try:
        baseline = {s.episode.episode_id: s for s in pool.score_many(episodes)}
    finally:
        pool.shutdown()
    # fresh actors (no keep-alive connection to the old server, see the first test), then the outage
    pool = RewardPool(cfg, num_actors=2)
    try:
        pool.wait_ready()
        endpoint.stop()
        for ep in episodes:
            pool.submit(ep)
        time.sleep(1.5)  # the actors meet connection refused meanwhile (checked below)
        endpoint.restart()
        again = {s.episode.episode_id: s for s in pool.results()}
        metrics = pool.metrics()
    finally:
        pool.shutdown()
    assert set(again) == set(baseline)  # no episode lost
    for eid, scored in again.items():
        assert scored.rewards == baseline[eid].rewards  # and none scored differently (no zeros)
        assert scored.stats["answer_failures"] == 0
    assert metrics["error_connection"] > 0 and metrics["retries"] > 0  # the outage did happen
    assert metrics["failures"] == 0 and metrics["actors_replaced"] == 0


@pytest.mark.heavy
def test_pool_reports_an_outage_past_the_budget_or_scores_zero_when_configured(ray_local, endpoint):
    from test_reward_pool import teacher_episodes

    from reward.pool import EpisodeScoringError, RewardPool

    endpoint.stop()
    episode = teacher_episodes(1, seed=12)[0]
    quick = ("reward.answerer.max_retries=1", "reward.answerer.backoff_s=0.01")
    pool = RewardPool(_pool_cfg(endpoint.base_url, *quick), num_actors=1)
    try:
        with pytest.raises(EpisodeScoringError) as info:
            list(pool.score_many([episode]))
    finally:
        pool.shutdown()
    outage = find_outage(info.value)
    assert outage is not None and outage.endpoint == endpoint.base_url
    assert f"episode {episode.episode_id}" in str(info.value)
    line = outage_message(info.value)
    assert endpoint.base_url in line and "reward.answerer.failure_scores_zero=true" in line

    pool = RewardPool(_pool_cfg(endpoint.base_url, *quick, "reward.answerer.failure_scores_zero=true"), num_actors=1)
    try:
        [scored] = list(pool.score_many([episode]))
        metrics = pool.metrics()
    finally:
        pool.shutdown()
    assert scored.global_score == 0.0 and scored.stats["answer_failures"] == scored.stats["answers"] > 0
    assert metrics["failures"] == scored.stats["answers"]  # counted in the run's reward_pool/ metrics


# ---- trainer level (real vLLM engine, DeepSpeed learner, reward pool, HTTP answerer) ------------
def _train_setup(tmp_path_factory):
    """A tiny model and synthetic train/eval data (tests/test_train_integration.py's)."""
    from test_train_integration import build_train_setup

    return build_train_setup(tmp_path_factory.mktemp("train-outage"))


@pytest.mark.heavy
def test_trainer_checkpoints_and_stops_in_one_line_then_resumes_losing_nothing(tmp_path_factory, monkeypatch):
    """The answerer starts answering 503 for good after step 1 is logged: the run saves the last
    finished step and stops with the outage line; a resume (endpoint healthy) trains the rest with
    the data order an uninterrupted run has."""
    import json
    import threading

    import ray
    from test_train_integration import _config

    from finemem.config import save_config
    from finemem.sampler import InstanceSampler
    from finemem.tracking import RunDir, read_metrics
    from learner.checkpoint import latest_checkpoint, read_state
    from learner.trainer import RunStopped, Trainer, build_config

    monkeypatch.setenv("WANDB_MODE", "disabled")
    if ray.is_initialized():  # the pool tests' 2-CPU Ray: the trainer starts its own, sized by its config
        ray.shutdown()
    tmp, model_dir = _train_setup(tmp_path_factory)
    server = OpenAITestServer().start()
    try:
        cfg = _config(tmp, model_dir, tmp / "train.jsonl", tmp / "eval.jsonl", total_steps=4)
        for key, value in {"kind": "openai", "base_url": server.base_url, "model": "test-model",
                           "max_retries": 2, "backoff_s": 0.05}.items():
            setattr(cfg.reward.answerer, key, value)
        cfg.learner.checkpoint_every = 100  # only the stop saves
        run = RunDir.create(cfg.run.out_dir, cfg.run.name)
        save_config(cfg, run.config_path)
        stop_watch = threading.Event()

        def take_endpoint_down() -> None:  # once step 1 is logged, every request gets a 503
            while not stop_watch.is_set():
                if read_metrics(run.metrics_path):
                    server.fail(10**9, status=503)
                    return
                stop_watch.wait(0.02)

        watcher = threading.Thread(target=take_endpoint_down, daemon=True)
        watcher.start()
        trainer = Trainer(cfg, run)
        try:
            trainer.start()
            with pytest.raises(RunStopped) as info:
                trainer.train()
        finally:
            stop_watch.set()
            trainer.shutdown()
            ray.shutdown()
        done = read_metrics(run.metrics_path)[-1]["step"]
        text = str(info.value)
        assert "\n" not in text and 1 <= done < 4
        assert f"reward answerer {server.base_url} unavailable past its retry budget" in text
        assert "reward.answerer.max_retries=2" in text and "reward.answerer.failure_scores_zero=true" in text
        assert f"the run stopped after step {done}" in text and f"resume={run.path}" in text
        ckpt = latest_checkpoint(run.path, checksums=True)
        assert ckpt is not None and read_state(ckpt)["client_state"]["step"] == done

        server.reset()  # the endpoint is back
        cfg2, run2, resumed = build_config([f"resume={run.path}"])
        assert resumed
        trainer = Trainer(cfg2, run2, resume=True)
        try:
            trainer.start()
            assert trainer.start_step == done
            trainer.train()
        finally:
            trainer.shutdown()
            ray.shutdown()
    finally:
        server.stop()
    order = [json.loads(line) for line in (run.path / "data_order.jsonl").read_text().splitlines()]
    assert [o["step"] for o in order] == [1, 2, 3, 4]
    sampler = InstanceSampler(5, cfg.run.seed)
    ids = [f"synth-7-{i}" for i in range(5)]
    assert [o["instances"] for o in order] == [[ids[i] for i in sampler.next_batch(2)] for _ in range(4)]
    rows = read_metrics(run.metrics_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["reward_stats/answer_failures"] == 0 for r in rows)  # no episode trained on scored 0
