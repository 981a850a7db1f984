"""TouchStone's judge: the pairwise prompt (image description, question, two answers), the reply's two
1-10 scores, and a client for any OpenAI-compatible chat endpoint with retries and backoff.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .compare import CompareSettings

JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to the "
    "user question displayed above. The user asks the question about an image, whose detailed description "
    "is given above. Please rate the helpfulness, relevance, accuracy and level of detail of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score "
    "indicates better overall performance.\n"
    "Please first output a single line containing only two values indicating the scores for Assistant 1 "
    "and 2, respectively. The two scores are separated by a space. In the subsequent line, please provide "
    "a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the "
    "order in which the responses were presented does not affect your judgment."
)


def judge_messages(annotation: str, question: str, answer1: str, answer2: str) -> list[dict[str, str]]:
    user = (
        f"[Image Description]\n{annotation}\n\n[Question]\n{question}\n\n"
        f"[The Start of Assistant 1's Answer]\n{answer1}\n[The End of Assistant 1's Answer]\n\n"
        f"[The Start of Assistant 2's Answer]\n{answer2}\n[The End of Assistant 2's Answer]\n\n"
        f"[System]\n{JUDGE_INSTRUCTION}\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_scores(content: str) -> tuple[float, float] | None:
    """The two 1-10 scores of the first non-empty line, which must hold nothing else (commas allowed)."""
    line = next((ln for ln in content.strip().splitlines() if ln.strip()), "")
    parts = line.replace(",", " ").split()
    if len(parts) != 2:
        return None
    try:
        a, b = (float(x) for x in parts)
    except ValueError:
        return None
    if not all(1.0 <= v <= 10.0 for v in (a, b)):
        return None
    return a, b


class JudgeCallError(Exception):
    """One failed judge call (kind: 'http 500', 'timeout', 'connection', 'bad response', 'unparsable')."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class OpenAIJudge:
    """POST {base_url}/chat/completions (OpenAI-compatible), temperature 0, plain urllib. The key is kept
    here and sent only as a header: it appears in no repr, error, cache or report."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout = timeout
        self.__key = api_key or None
        self.has_key = self.__key is not None

    def __repr__(self) -> str:
        return f"OpenAIJudge({self.url!r}, model={self.model!r})"

    @classmethod
    def from_settings(cls, s: CompareSettings, env: dict[str, str] | None = None) -> OpenAIJudge:
        env = os.environ if env is None else env
        return cls(s.judge_url, s.judge_model, env.get(s.judge_key_env), s.judge_timeout)

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.__key:
            headers["Authorization"] = f"Bearer {self.__key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (user-given URL)
                payload = json.loads(resp.read())
            content = payload["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            raise JudgeCallError(f"http {e.code}") from None
        except http.client.HTTPException:  # IncompleteRead, BadStatusLine...
            raise JudgeCallError("connection") from None
        except (TimeoutError, OSError) as e:  # socket timeouts, refused connections, URLError
            reason = getattr(e, "reason", e)
            raise JudgeCallError("timeout" if isinstance(reason, TimeoutError) else "connection") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeCallError("bad response") from None
        if not isinstance(content, str):
            raise JudgeCallError("bad response")
        return content


@dataclass
class JudgeRound:
    order: str  # reference_first | model_first
    model_score: float | None
    reference_score: float | None
    error: str | None = None  # last failure kind when the round was excluded
    attempts: int = 0  # calls made this run (0: from the cache)


def ask_judge(
    judge: Any, messages: list[dict[str, str]], retries: int = 5, sleep: Callable[[float], None] = time.sleep,
    backoff_s: float = 1.0,
) -> tuple[tuple[float, float] | None, str | None, str | None, int]:  # fmt: skip
    """(scores, content, last error kind, calls): up to 1 + `retries` calls, sleeping backoff_s * 2^k
    (capped at 60 s) after the k-th failure; an unparsable first line counts as a failure."""
    err = None
    for k in range(retries + 1):
        try:
            content = judge.complete(messages)
            scores = parse_scores(content)
            if scores is not None:
                return scores, content, None, k + 1
            err = "unparsable"
        except JudgeCallError as e:
            err = e.kind
        if k < retries:
            sleep(min(60.0, backoff_s * 2**k))
    return None, None, err, retries + 1
