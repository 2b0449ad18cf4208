"""A small OpenAI-compatible chat server for tests and local runs (stdlib `http.server`, real HTTP).

It serves `POST /v1/chat/completions` and `GET /v1/models` on 127.0.0.1 with a rule-based
"model" that is good enough to exercise the clients end to end:

- answer prompts (`reward.answerers.answer_messages`): replies with the memory line sharing the
  most words with the question (so a substring metric scores it like an extractive reader);
- yes/no judge prompts: "yes" when a gold alias is a substring of the response;
- content-judge prompts: "yes" when most of the entry's words occur in the chunk;
- chunk-QA generator prompts (`reward.chunk_qa`): a JSON list of cloze questions, one per
  sentence of the chunk (answer = the sentence's last word), optionally with a duplicate and an
  unanswerable pair (`gen_duplicates`, `gen_bad_pairs`) so verification has something to reject.

Faults are scripted per test: `fail(n, status)`, `hang(n, seconds)`, `malformed(n, kind)`, each
optionally only for requests whose text contains `match`; `delay_s` slows every request; `handler`
replaces the model entirely. Every request body is recorded in `requests`.

    with OpenAITestServer() as srv:
        cfg.reward.answerer.base_url = srv.base_url
        srv.fail(2, status=503)

Run one by hand: `python -m reward.openai_test_server --port 8000`.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE = re.compile(r"[^.!?]+[.!?]?")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


@dataclass
class Fault:
    """A scripted misbehaviour for the next `remaining` matching requests."""

    action: str  # fail | hang | malformed
    remaining: int
    match: str | None = None
    status: int = 500
    seconds: float = 30.0
    kind: str = "not_json"  # malformed: not_json | no_choices | null_content


def _section(text: str, name: str) -> str:
    """The text after `name:` up to the next blank line or `Xxx:` header line."""
    m = re.search(
        rf"^{re.escape(name)}:\s*\n?(.*?)(?:\n\n|\n[A-Z][a-z ]+:|\Z)", text, re.DOTALL | re.MULTILINE
    )
    return m.group(1).strip() if m else ""


def cloze_pairs(chunk: str) -> list[dict[str, str]]:
    """One fill-in-the-blank question per sentence: the answer is the sentence's last word."""
    pairs = []
    for sent in _SENTENCE.findall(chunk):
        sent = sent.strip()
        words = re.findall(r"[A-Za-z0-9']+", sent)
        if len(words) < 3:
            continue
        answer = words[-1]
        idx = sent.rfind(answer)
        question = f"Fill in the blank: {sent[:idx]}___{sent[idx + len(answer) :]}"
        pairs.append({"question": question, "answer": answer})
    return pairs


class RuleModel:
    """The default reply for a chat request (see the module docstring)."""

    def __init__(self) -> None:
        self.gen_duplicates = 0  # extra copies of the first proposal per generator call
        self.gen_bad_pairs = 0  # proposals whose answer is not in the chunk

    def reply(self, body: dict[str, Any]) -> str:
        from reward.answerers import ANSWER_SYSTEM, CONTENT_JUDGE_SYSTEM, JUDGE_SYSTEM
        from reward.chunk_qa import GENERATOR_SYSTEM

        msgs = body.get("messages") or []
        system = next((m.get("content", "") for m in msgs if m.get("role") == "system"), "")
        user = next((m.get("content", "") for m in reversed(msgs) if m.get("role") == "user"), "")
        if system == JUDGE_SYSTEM:
            gold = _section(user, "Correct answer")
            response = _section(user, "Response").lower()
            ok = any(g.strip() and g.strip().lower() in response for g in gold.split(" | "))
            return "yes" if ok else "no"
        if system == CONTENT_JUDGE_SYSTEM:
            chunk = set(_words(_section(user, "Chunk")))
            entry = _words(_section(user, "Memory entry"))
            ok = bool(entry) and sum(w in chunk for w in entry) >= 0.5 * len(entry)
            return "yes" if ok else "no"
        if system == GENERATOR_SYSTEM:
            pairs = cloze_pairs(_section(user, "Chunk"))
            pairs += pairs[:1] * self.gen_duplicates
            pairs += [
                {"question": f"What is the unknown fact number {i}?", "answer": f"zzq{i}"}
                for i in range(self.gen_bad_pairs)
            ]
            return json.dumps(pairs)
        if system == ANSWER_SYSTEM or "Question:" in user:
            question = set(_words(_section(user, "Question")))
            lines = [re.sub(r"^(?:\[[^\]]*\]|-)\s*", "", ln) for ln in _section(user, "Memory").splitlines()]
            lines = [ln for ln in lines if ln and ln != "(no memory entries)"]
            if not lines:
                return "I don't know."
            best = max(lines, key=lambda ln: len(question & set(_words(ln))))
            return best
        return "ok"


class OpenAITestServer:
    """A threaded OpenAI-compatible server on 127.0.0.1 (port 0 picks a free port)."""

    def __init__(self, port: int = 0, model: str = "test-model") -> None:
        self.model_name = model
        self.model = RuleModel()
        self.handler: Callable[[dict[str, Any]], str] | None = None
        self.delay_s = 0.0
        self.requests: list[dict[str, Any]] = []
        self.faults: list[Fault] = []
        self.in_flight = 0
        self.max_in_flight = 0  # the most chat requests handled at the same time
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # scripted faults
    def fail(self, n: int, status: int = 500, match: str | None = None) -> None:
        self._add(Fault("fail", n, match, status=status))

    def hang(self, n: int, seconds: float = 30.0, match: str | None = None) -> None:
        self._add(Fault("hang", n, match, seconds=seconds))

    def malformed(self, n: int, kind: str = "not_json", match: str | None = None) -> None:
        self._add(Fault("malformed", n, match, kind=kind))

    def _add(self, fault: Fault) -> None:
        with self._lock:
            self.faults.append(fault)

    def take_fault(self, text: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.remaining > 0 and (f.match is None or f.match in text):
                    f.remaining -= 1
                    return f
        return None

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)

    def reset(self) -> None:
        """Forget faults, requests and overrides (between tests sharing one server)."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()
            self.max_in_flight = 0
        self.handler = None
        self.delay_s = 0.0
        self.model = RuleModel()

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    # lifecycle
    def start(self) -> OpenAITestServer:
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="openai-test-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases hanging requests
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _make_handler(srv: OpenAITestServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet
            return

        def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                data = {"object": "list", "data": [{"id": srv.model_name, "object": "model"}]}
                self._send(200, json.dumps(data).encode())
            else:
                self._send(404, b'{"error": "not found"}')

        def do_POST(self):
            srv._enter()
            try:
                status, payload = self._chat()
            finally:
                srv._leave()  # before replying: a client's next request may start right after the reply
            self._send(status, payload)

        def _chat(self) -> tuple[int, bytes]:
            """(status, body) of one chat request."""
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/v1/chat/completions":
                return 404, b'{"error": "not found"}'
            try:
                body = json.loads(raw)
            except ValueError:
                return 400, b'{"error": "request body is not JSON"}'
            srv.record(body)
            text = "\n".join(str(m.get("content", "")) for m in body.get("messages") or [])
            if srv.delay_s:
                srv._stop.wait(srv.delay_s)
            fault = srv.take_fault(text)
            if fault is not None and fault.action == "fail":
                return fault.status, json.dumps({"error": f"scripted failure {fault.status}"}).encode()
            if fault is not None and fault.action == "hang":
                srv._stop.wait(fault.seconds)
            if fault is not None and fault.action == "malformed":
                if fault.kind == "not_json":
                    return 200, b"<html>this is not json</html>"
                if fault.kind == "no_choices":
                    return 200, json.dumps({"id": "x", "object": "chat.completion"}).encode()
                msg = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]}
                return 200, json.dumps(msg).encode()
            content = srv.handler(body) if srv.handler is not None else srv.model.reply(body)
            usage = {"prompt_tokens": len(text.split()), "completion_tokens": len(content.split())}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            resp = {
                "id": f"chatcmpl-{len(srv.requests)}",
                "object": "chat.completion",
                "model": body.get("model", srv.model_name),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return 200, json.dumps(resp).encode()

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="OpenAI-compatible rule-based chat server for local runs")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    srv = OpenAITestServer(port=args.port).start()
    print(f"serving {srv.base_url} (Ctrl-C to stop)", flush=True)
    try:
        srv._thread.join()  # type: ignore[union-attr]
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
