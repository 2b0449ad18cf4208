"""The reasoning agent (frozen): answers a question from retrieved memory items.

One interface serves chunk QA, global QA and evaluation:

    answer = await answerer.answer(question, evidence_items, episode_id=...)

- `EvidenceReader` (CPU default, no LLM): the answer is the text of the evidence items, so with
  substring metrics a question scores 1 exactly when a gold alias is in the top-k evidence.
- `OpenAIChatAnswerer`: any OpenAI-compatible `/chat/completions` endpoint (`vllm serve` of
  Qwen3-32B on the cluster, or a hosted API), with a concurrency limit, bounded retries with
  exponential backoff, per-request timeouts, and metrics. It also provides the LLM yes/no judge
  (LongMemEval-style sources) and Mem-alpha's memory-content judge through the same client.

A request that still fails after its retries raises `AnswererUnavailable` (an `AnswererError`)
carrying the episode id and the endpoint; the scorer scores it 0 only when
`reward.answerer.failure_scores_zero` is set, otherwise the trainer checkpoints and stops with
`outage_message`. The retry budget: `max_retries` waits of `backoff_s * 2**i` (+ up to 10% jitter),
each capped at `backoff_max_s` (see `OpenAIChatAnswerer.retry_budget_s`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from finemem.config import AnswererConfig, ConfigError
from finemem.records import MemoryItem

ANSWER_SYSTEM = (
    "You answer questions using only the memory entries given. "
    "Reply with the answer only: a short phrase, no explanation. "
    "If the memory does not contain the answer, reply with your best guess."
)
JUDGE_SYSTEM = (
    "You are grading an answer. Given a question, the correct answer and a response, "
    "reply 'yes' if the response contains the correct answer or is equivalent to it, otherwise 'no'. "
    "Reply with one word: yes or no."
)
CONTENT_JUDGE_SYSTEM = (
    "You are grading a memory entry written while reading a text chunk. Reply 'yes' if the entry "
    "states information that is in the chunk, correctly and concisely, and is worth remembering; "
    "otherwise 'no'. Reply with one word: yes or no."
)
_THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)


BACKOFF_MAX_S = 30.0  # default cap of one retry wait (`reward.answerer.backoff_max_s`)


class AnswererError(RuntimeError):
    """A request that failed after every retry (or a non-retryable error)."""

    def __init__(self, message: str, episode_id: str | None = None, attempts: int = 0) -> None:
        where = f"episode {episode_id}: " if episode_id else ""
        super().__init__(f"{where}{message}")
        self.episode_id = episode_id
        self.attempts = attempts

    def __reduce__(self):  # keep the class and fields when Ray pickles the exception across processes
        return (_rebuild_answerer_error, (type(self), self.args[0], dict(self.__dict__)))


class AnswererUnavailable(AnswererError):
    """The endpoint did not answer (connection refused, timeouts, 5xx, 429, garbage) within the
    retry budget. The trainer turns it into a checkpoint and one stop line (`outage_message`)."""

    def __init__(self, message: str, episode_id: str | None = None, attempts: int = 0,
                 endpoint: str = "", waited_s: float = 0.0) -> None:
        super().__init__(message, episode_id, attempts)
        self.endpoint = endpoint
        self.waited_s = waited_s


def _rebuild_answerer_error(cls: type, text: str, fields: dict[str, Any]) -> AnswererError:
    err = cls.__new__(cls)
    err.args = (text,)
    err.__dict__.update(fields)
    return err


def find_outage(err: BaseException | None) -> AnswererUnavailable | None:
    """The `AnswererUnavailable` behind `err` (through Ray's task errors and exception chains)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, AnswererUnavailable):
            return err
        seen.add(id(err))
        err = getattr(err, "cause", None) or err.__cause__
    return None


def outage_message(err: BaseException | None) -> str | None:
    """One line for a run that stops because the answerer stayed down, or None for other errors."""
    outage = find_outage(err)
    if outage is None:
        return None
    return (f"reward answerer {outage.endpoint or '(endpoint unknown)'} unavailable past its retry budget "
            f"({' '.join(str(outage).split())}); to wait out longer outages raise reward.answerer.max_retries "
            "/ reward.answerer.backoff_s, or set reward.answerer.failure_scores_zero=true to score such "
            "questions 0 and keep training")


@runtime_checkable
class Answerer(Protocol):
    """What the scorer needs from a reasoning agent."""

    is_llm: bool

    async def answer(
        self, question: str, evidence: list[MemoryItem], *, episode_id: str | None = None
    ) -> str: ...

    async def judge(
        self, question: str, prediction: str, golds: Sequence[str], *, episode_id: str | None = None
    ) -> bool: ...

    def metrics(self) -> dict[str, float]: ...

    async def close(self) -> None: ...


def format_evidence(evidence: Sequence[MemoryItem]) -> str:
    """Retrieved items as the answerer sees them: `- content` lines, in retrieval order.

    No item ids: they mean nothing to the answerer, and without them equal evidence is an equal
    request whichever ids the rollouts gave it, so the request cache (`reward.answer_cache`) answers
    it once."""
    if not evidence:
        return "(no memory entries)"
    return "\n".join(f"- {m.content}" for m in evidence)


# The benchmark's answer instruction per competency (MemoryAgentBench's templates, shortened), added
# to ANSWER_SYSTEM by `finemem eval`. Conflict Resolution states MAB's rule for FactConsolidation.
COMPETENCY_RULES = {
    "accurate_retrieval": "Give a very concise answer, without other words.",
    "conflict_resolution": (
        "Facts may conflict: the newer fact supersedes older ones about the same subject. A fact that starts "
        "with a serial number is newer than every fact with a smaller serial number: the larger serial number "
        "is the newer fact. Answer from the newest fact, very concisely, without other words."
    ),
    "test_time_learning": "The memory holds labelled examples; reply with the label number only, as \\boxed{N}.",
    "long_range_understanding": "Summarise what the memory says about the question, covering its key points.",
}


def answer_messages(question: str, evidence: Sequence[MemoryItem], competency: str | None = None
                    ) -> list[dict[str, str]]:
    """The chat prompt for answering `question` from `evidence`; with a `competency`, the benchmark's
    instruction for it (`COMPETENCY_RULES`) follows the system prompt."""
    system = ANSWER_SYSTEM
    if competency is not None:
        if competency not in COMPETENCY_RULES:
            raise ValueError(f"unknown competency {competency!r}; known: {', '.join(COMPETENCY_RULES)}")
        system = f"{ANSWER_SYSTEM}\n{COMPETENCY_RULES[competency]}"
    user = f"Memory:\n{format_evidence(evidence)}\n\nQuestion: {question}\nAnswer:"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def judge_messages(question: str, prediction: str, golds: Sequence[str]) -> list[dict[str, str]]:
    """The chat prompt of the yes/no answer judge (LongMemEval style)."""
    gold = " | ".join(golds)
    user = f"Question: {question}\nCorrect answer: {gold}\nResponse: {prediction}\n\nIs the response correct?"
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def content_judge_messages(chunk: str, content: str) -> list[dict[str, str]]:
    """The chat prompt of Mem-alpha's memory-content judge."""
    user = f"Chunk:\n{chunk}\n\nMemory entry:\n{content}\n\nIs this a good memory entry for the chunk?"
    return [{"role": "system", "content": CONTENT_JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_yes_no(text: str) -> bool | None:
    """True for a reply starting with yes, False for no, None otherwise."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] == "yes":
        return True
    if words[0] == "no":
        return False
    return None


class EvidenceReader:
    """The CPU answerer: no LLM; the answer is the retrieved evidence text itself.

    Its `judge` is a proxy (no LLM): yes when a gold alias, lowercased, is a substring of the
    lowercased prediction. Mem-alpha's content judge needs an LLM and is not available here.
    """

    is_llm = False

    def __init__(self) -> None:
        self._calls = 0

    async def answer(
        self, question: str, evidence: list[MemoryItem], *, episode_id: str | None = None
    ) -> str:
        self._calls += 1
        return "\n".join(m.content for m in evidence)

    async def judge(
        self, question: str, prediction: str, golds: Sequence[str], *, episode_id: str | None = None
    ) -> bool:
        pred = prediction.lower()
        return any(g.strip() and g.strip().lower() in pred for g in golds)

    def metrics(self) -> dict[str, float]:
        return {"answer_calls": float(self._calls)}

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class ChatReply:
    """One chat completion: its text (thinking removed) and the server's finish reason."""

    text: str
    finish_reason: str = "stop"


class _RetryableError(Exception):
    """A failure worth retrying; `kind` is its metrics bucket."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class OpenAIChatAnswerer:
    """An OpenAI-compatible chat client used as answerer and judge.

    Retries (waits `backoff_s * 2**i`, each capped at `backoff_max_s`, plus up to 10% jitter) on
    connection errors (refused: the endpoint is down or restarting), timeouts, HTTP 429 and 5xx,
    and malformed responses, then raises `AnswererUnavailable`; other HTTP errors (400, 401, 404)
    fail at once as `AnswererError`. The aiohttp session is bound to the running event loop and re-created when the loop
    changes, so one answerer can serve several `asyncio.run` calls (call `close()` at the end of
    each loop to release its connections).
    """

    is_llm = True

    def __init__(self, cfg: AnswererConfig) -> None:
        self.base_url = str(cfg.base_url).rstrip("/")
        self.model = str(cfg.model)
        self.temperature = float(cfg.temperature)
        self.max_tokens = int(cfg.max_tokens)
        self.concurrency = int(cfg.concurrency)
        self.timeout_s = float(cfg.timeout_s)
        self.max_retries = int(cfg.max_retries)
        self.backoff_s = float(cfg.backoff_s)
        self.backoff_max_s = float(getattr(cfg, "backoff_max_s", BACKOFF_MAX_S))
        self.disable_thinking = bool(cfg.disable_thinking)
        self.api_key = os.environ.get(str(cfg.api_key_env), "") if cfg.api_key_env else ""
        if self.concurrency < 1:
            raise ConfigError(f"answerer concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"answerer max_retries must be >= 0, got {self.max_retries}")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ConfigError(f"reward.answerer.backoff_s={self.backoff_s:g} (and its cap "
                              f"{self.backoff_max_s:g} s) must be >= 0")
        self._session: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sem: asyncio.Semaphore | None = None
        self._counts: Counter[str] = Counter()
        self._latency_sum = 0.0
        self._latency_max = 0.0

    def backoff(self, retry: int) -> float:
        """The wait before retry number `retry` (1-based), without jitter: doubling, capped."""
        return min(self.backoff_max_s, self.backoff_s * (2 ** (retry - 1)))

    def retry_budget_s(self) -> float:
        """How long an endpoint may stay down before a request gives up (waits only, no jitter)."""
        return sum(self.backoff(r) for r in range(1, self.max_retries + 1))

    # ------------------------------------------------------------------ public API
    async def answer(
        self, question: str, evidence: list[MemoryItem], *, episode_id: str | None = None
    ) -> str:
        return await self.chat(answer_messages(question, evidence), episode_id=episode_id)

    async def judge(
        self, question: str, prediction: str, golds: Sequence[str], *, episode_id: str | None = None
    ) -> bool:
        """LLM yes/no judge; an unparsable verdict counts as "no" (and is counted in metrics)."""
        reply = await self.chat(
            judge_messages(question, prediction, golds), episode_id=episode_id, max_tokens=8
        )
        verdict = parse_yes_no(reply)
        if verdict is None:
            self._counts["judge_unparsed"] += 1
        return bool(verdict)

    async def judge_content(self, chunk: str, content: str, *, episode_id: str | None = None) -> bool:
        """Mem-alpha's memory-content judge for one insert/update."""
        reply = await self.chat(content_judge_messages(chunk, content), episode_id=episode_id, max_tokens=8)
        verdict = parse_yes_no(reply)
        if verdict is None:
            self._counts["judge_unparsed"] += 1
        return bool(verdict)

    async def chat(
        self,
        messages: list[dict[str, str]],
        *,
        episode_id: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> str:
        """One chat completion's text (thinking blocks removed), with retries."""
        reply = await self.chat_reply(messages, episode_id=episode_id, max_tokens=max_tokens,
                                      temperature=temperature)
        return reply.text

    async def chat_reply(
        self,
        messages: list[dict[str, str]],
        *,
        episode_id: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatReply:
        """`chat` with the reply's finish reason ("stop", "length", ...): a memory manager needs to
        know whether its tool calls were cut by the token limit."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature if temperature is None else temperature,
            "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
        }
        if self.disable_thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        session, sem = self._session_and_semaphore()
        last = "no attempt"
        attempts = 0
        start = time.monotonic()
        for attempt in range(self.max_retries + 1):
            attempts = attempt + 1
            if attempt:
                self._counts["retries"] += 1
                await asyncio.sleep(self.backoff(attempt) * (1.0 + 0.1 * random.random()))
            async with sem:
                try:
                    return await self._post(session, body)
                except _RetryableError as e:
                    self._counts[f"error_{e.kind}"] += 1
                    last = f"{e.kind}: {e}"
                except AnswererError as e:  # not retryable
                    self._counts["failures"] += 1
                    raise AnswererError(str(e), episode_id, attempts) from None
        self._counts["failures"] += 1
        waited = time.monotonic() - start
        raise AnswererUnavailable(
            f"{self.base_url}/chat/completions failed after {attempts} attempts over {waited:.1f} s "
            f"(last: {last}; reward.answerer.max_retries={self.max_retries}, "
            f"reward.answerer.backoff_s={self.backoff_s:g})",
            episode_id,
            attempts,
            endpoint=self.base_url,
            waited_s=waited,
        )

    def metrics(self) -> dict[str, float]:
        ok = self._counts["successes"]
        out = {k: float(v) for k, v in self._counts.items()}
        for key in ("requests", "successes", "failures", "retries", "prompt_tokens", "completion_tokens"):
            out.setdefault(key, 0.0)
        out["latency_mean_s"] = self._latency_sum / ok if ok else 0.0
        out["latency_max_s"] = self._latency_max
        return out

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
        self._loop = None
        self._sem = None

    # ------------------------------------------------------------------ internals
    def _session_and_semaphore(self):
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            headers = {"Content-Type": "application/json"}
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._session = aiohttp.ClientSession(
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.concurrency),
            )
            self._loop = loop
            self._sem = asyncio.Semaphore(self.concurrency)
        return self._session, self._sem

    async def _post(self, session, body: dict[str, Any]) -> ChatReply:
        import aiohttp

        self._counts["requests"] += 1
        start = time.perf_counter()
        try:
            async with session.post(f"{self.base_url}/chat/completions", json=body) as resp:
                raw = await resp.read()
                status = resp.status
        except asyncio.TimeoutError:
            raise _RetryableError("timeout", f"no response within {self.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as e:  # refused, reset, DNS, server gone mid-reply
            raise _RetryableError("connection", f"{type(e).__name__}: {e}") from None
        if status == 429 or status >= 500:
            raise _RetryableError(f"http_{status}", raw[:200].decode("utf-8", "replace"))
        if status != 200:
            raise AnswererError(f"HTTP {status} from {self.base_url}: {raw[:300].decode('utf-8', 'replace')}")
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(f"message content is {type(content).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _RetryableError("malformed", f"bad response body ({e}): {raw[:200]!r}") from None
        finish = data["choices"][0].get("finish_reason") if isinstance(data["choices"][0], dict) else None
        elapsed = time.perf_counter() - start
        self._counts["successes"] += 1
        self._latency_sum += elapsed
        self._latency_max = max(self._latency_max, elapsed)
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(key), int):
                    self._counts[key] += usage[key]
        return ChatReply(_THINK_RE.sub("", content).strip(), str(finish or "stop"))


def make_answerer(cfg: AnswererConfig) -> EvidenceReader | OpenAIChatAnswerer:
    """The answerer named by `reward.answerer.kind`: evidence | openai."""
    kind = str(cfg.kind)
    if kind == "evidence":
        return EvidenceReader()
    if kind == "openai":
        return OpenAIChatAnswerer(cfg)
    raise ConfigError(f"reward.answerer.kind={kind!r} is unknown (choose one of: evidence, openai)")
