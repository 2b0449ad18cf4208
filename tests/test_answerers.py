"""Answerers over real HTTP on 127.0.0.1: the OpenAI-compatible client against the local test server,
with scripted errors, hangs and malformed responses; and the scorer driving an HTTP answerer."""

from __future__ import annotations

import asyncio
import socket

import pytest

from finemem.config import AnswererConfig, ConfigError, load_config
from finemem.records import Episode, Instance, MemoryItem, OpResult, QAPair, StepSample
from reward.answerers import (
    AnswererError,
    EvidenceReader,
    OpenAIChatAnswerer,
    make_answerer,
    parse_yes_no,
)
from reward.openai_test_server import OpenAITestServer
from reward.scorer import score_episode

EVIDENCE = [MemoryItem("m1", "Mira's locker code is 4821.", 1), MemoryItem("m2", "Tom likes green tea.", 2)]


@pytest.fixture(scope="module")
def module_server():
    with OpenAITestServer() as srv:
        yield srv


@pytest.fixture
def server(module_server):
    module_server.reset()
    return module_server


def client(srv: OpenAITestServer, **kw) -> OpenAIChatAnswerer:
    cfg = AnswererConfig(kind="openai", base_url=srv.base_url, model="test-model", backoff_s=0.01, **kw)
    return OpenAIChatAnswerer(cfg)


def run(answerer, coro_fn):
    async def go():
        try:
            return await coro_fn()
        finally:
            await answerer.close()

    return asyncio.run(go())


def test_evidence_reader():
    r = EvidenceReader()
    assert asyncio.run(r.answer("q", EVIDENCE)) == "Mira's locker code is 4821.\nTom likes green tea."
    assert asyncio.run(r.answer("q", [])) == ""
    assert asyncio.run(r.judge("q", "The code is 4821", ["4821"])) is True
    assert asyncio.run(r.judge("q", "no idea", ["4821"])) is False
    assert r.metrics()["answer_calls"] == 2


def test_make_answerer():
    assert isinstance(make_answerer(AnswererConfig(kind="evidence")), EvidenceReader)
    assert isinstance(make_answerer(AnswererConfig(kind="openai")), OpenAIChatAnswerer)
    with pytest.raises(ConfigError, match="choose one of"):
        make_answerer(AnswererConfig(kind="gpt"))


def test_parse_yes_no():
    assert parse_yes_no("Yes.") is True
    assert parse_yes_no(" no, it is wrong") is False
    assert parse_yes_no("maybe") is None
    assert parse_yes_no("") is None


def test_answer_over_http_sends_the_request_we_mean(server):
    a = client(server)
    out = run(a, lambda: a.answer("What is Mira's locker code?", EVIDENCE, episode_id="e1"))
    assert "4821" in out
    (body,) = server.requests
    assert body["model"] == "test-model"
    assert body["temperature"] == 0.1
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "\n- Mira's locker code is 4821." in body["messages"][-1]["content"]
    assert "[m1]" not in body["messages"][-1]["content"]  # ids mean nothing to the answerer
    m = a.metrics()
    assert m["requests"] == 1 and m["successes"] == 1 and m["failures"] == 0
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0 and m["latency_mean_s"] > 0


def test_thinking_off_can_be_disabled_and_think_blocks_are_stripped(server):
    server.handler = lambda body: "<think>\nlet me see\n</think>\n\nyes"
    a = client(server, disable_thinking=False)
    assert run(a, lambda: a.judge("q", "4821", ["4821"])) is True
    assert "chat_template_kwargs" not in server.requests[0]


def test_retries_on_5xx_and_429_then_succeeds(server):
    server.fail(2, status=503)
    server.fail(1, status=429)
    a = client(server, max_retries=3)
    assert "4821" in run(a, lambda: a.answer("What is Mira's locker code?", EVIDENCE))
    m = a.metrics()
    assert m["requests"] == 4 and m["retries"] == 3 and m["error_http_503"] == 2 and m["error_http_429"] == 1
    assert m["failures"] == 0


def test_gives_up_after_max_retries_with_the_episode_id(server):
    server.fail(10, status=500)
    a = client(server, max_retries=2)
    with pytest.raises(AnswererError, match="episode ep-42: .*failed after 3 attempts") as info:
        run(a, lambda: a.answer("q", EVIDENCE, episode_id="ep-42"))
    assert info.value.episode_id == "ep-42" and info.value.attempts == 3
    assert len(server.requests) == 3
    assert a.metrics()["failures"] == 1


def test_client_errors_are_not_retried(server):
    server.fail(5, status=400)
    a = client(server, max_retries=3)
    with pytest.raises(AnswererError, match="HTTP 400"):
        run(a, lambda: a.answer("q", EVIDENCE, episode_id="e"))
    assert len(server.requests) == 1


def test_timeout_is_retried(server):
    server.hang(1, seconds=10.0)
    a = client(server, timeout_s=0.3, max_retries=1)
    assert "4821" in run(a, lambda: a.answer("What is Mira's locker code?", EVIDENCE))
    assert a.metrics()["error_timeout"] == 1
    assert len(server.requests) == 2


@pytest.mark.parametrize("kind", ["not_json", "no_choices", "null_content"])
def test_malformed_responses_are_retried(server, kind):
    server.malformed(1, kind=kind)
    a = client(server, max_retries=1)
    assert "4821" in run(a, lambda: a.answer("What is Mira's locker code?", EVIDENCE))
    assert a.metrics()["error_malformed"] == 1


def test_malformed_every_time_fails(server):
    server.malformed(5, kind="no_choices")
    a = client(server, max_retries=1)
    with pytest.raises(AnswererError, match="malformed"):
        run(a, lambda: a.answer("q", EVIDENCE, episode_id="e"))


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    a = OpenAIChatAnswerer(
        AnswererConfig(kind="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01)
    )
    with pytest.raises(AnswererError, match="connection"):
        run(a, lambda: a.answer("q", EVIDENCE, episode_id="e"))
    assert a.metrics()["error_connection"] == 3


def test_concurrency_limit_is_respected():
    with OpenAITestServer() as server:  # its own server: no request left hanging by another test
        server.delay_s = 0.2
        a = client(server, concurrency=2)

        async def many():
            return await asyncio.gather(*(a.answer(f"What is Mira's code {i}?", EVIDENCE) for i in range(6)))

        out = run(a, many)
        assert len(out) == 6 and len(server.requests) == 6
        assert server.max_in_flight == 2


def test_judges_over_http(server):
    a = client(server)

    async def both():
        return (
            await a.judge("What is the code?", "It is 4821.", ["4821"]),
            await a.judge("What is the code?", "It is 1111.", ["4821"]),
            await a.judge_content("Mira's locker code is 4821. It rained.", "Mira's locker code is 4821"),
            await a.judge_content("Mira's locker code is 4821.", "Paris is the capital of France"),
        )

    assert run(a, both) == (True, False, True, False)


def test_one_answerer_survives_several_event_loops(server):
    a = client(server)
    for _ in range(2):
        assert "4821" in run(a, lambda: a.answer("What is Mira's locker code?", EVIDENCE))
    assert a.metrics()["successes"] == 2


# ------------------------------------------------------------------- scorer with an HTTP answerer


def _episode(data_source: str = "synthetic") -> Episode:
    inst = Instance(
        instance_id="http-1",
        chunks=["Ann's code is 4821. The sky was grey.", "Bob's dog is Rex."],
        questions=[QAPair("What is Bob's dog called?", ["Rex"])],
        chunk_qa=[[QAPair("What is Ann's code?", ["4821"])], [QAPair("What is Bob's dog?", ["Rex"])]],
        data_source=data_source,
    )
    m1, m2 = MemoryItem("m1", "Ann's code is 4821.", 1), MemoryItem("m2", "Bob's dog is Rex.", 2)
    steps = [
        StepSample(1, [], [], [], "", [OpResult("insert", True, memory_id="m1")], [m1]),
        StepSample(2, [], [], [], "", [OpResult("insert", True, memory_id="m2"),
                                       OpResult("delete", True, memory_id="m9")], [m1, m2]),
    ]  # fmt: skip
    return Episode("http-1/3", inst, 3, steps)


def _cfg(srv, *extra):
    return load_config(
        [f"reward.answerer.base_url={srv.base_url}", "reward.answerer.kind=openai",
         "reward.answerer.backoff_s=0.01", "reward.answerer.max_retries=1", *extra]
    )  # fmt: skip


def test_scorer_with_http_answerer(server):
    cfg = _cfg(server)
    out = score_episode(_episode(), cfg, make_answerer(cfg.reward.answerer))
    assert out.components["chunk"] == [1.0, 1.0]
    assert out.global_score == 1.0
    assert len(server.requests) == 3  # 2 chunk questions + 1 global question, nothing else


def test_scorer_reports_failed_requests_with_the_episode_id(server):
    server.fail(100, status=503)
    cfg = _cfg(server)
    with pytest.raises(AnswererError, match="episode http-1/3"):
        score_episode(_episode(), cfg, make_answerer(cfg.reward.answerer))


def test_scorer_scores_zero_only_when_configured(server):
    server.fail(2, status=503, match="Bob's dog called")  # the global question fails twice (1 retry)
    cfg = _cfg(server, "reward.answerer.failure_scores_zero=true")
    out = score_episode(_episode(), cfg, make_answerer(cfg.reward.answerer))
    assert out.global_score == 0.0
    assert out.stats["answer_failures"] == 1.0
    assert out.components["chunk"] == [1.0, 1.0]


def test_memalpha_content_reward_and_llm_judge_source(server):
    cfg = _cfg(server, "reward=memalpha")
    out = score_episode(_episode("lme_train"), cfg, make_answerer(cfg.reward.answerer))
    # step 1: one good insert -> 1; step 2: good insert + delete (0) -> 0.5
    assert out.components["content"] == [1.0, 0.5]
    assert "chunk" not in out.components
    systems = [b["messages"][0]["content"] for b in server.requests]
    assert sum("grading an answer" in s for s in systems) == 1  # lme_train: the yes/no judge
    assert sum("grading a memory entry" in s for s in systems) == 2
    assert out.global_score == 1.0
    assert out.rewards == pytest.approx(
        [1.0 + 1.0 + 0.05 * out.components["compression"][0] + 0.1 * 1.0,
         1.0 + 1.0 + 0.05 * out.components["compression"][0] + 0.1 * 0.5]
    )  # fmt: skip
