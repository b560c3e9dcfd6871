"""The request bodies of keenlm serve's API, validated by pydantic (FastAPI answers a body that
does not fit with a 400), and OpenAI's error object.

Fields follow OpenAI's API; ``top_k``, ``strategy``, ``task`` and ``scorer`` are keenlm's
extensions (the openai client sends them through ``extra_body``). A field OpenAI does not
define is refused, as OpenAI refuses it.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # samples per request (the scheduler's slots bound it further)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers or {}


def error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Sampling(BaseModel):
    """The fields completions and chat share."""
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[int] = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # extension
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # extensions (the openai client sends them through extra_body): test-time compute
    strategy: Optional[str] = None  # a keenlm.infer.search strategy; n is its sample budget
    task: Optional[str] = None  # a keenlm task: verifier for the scorer, answer key for votes
    scorer: Optional[str] = None  # verifier | reward_model (default: the reward model if loaded)


class CompletionRequest(Sampling):
    # one prompt (text or token ids) or a batch of them; choice i*n + j is sample j of prompt i
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(default=None, ge=0)  # 0: with echo, the prompt's logprobs
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str
    name: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(default=None, gt=0)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    # vLLM's field (lm-evaluation-harness sends it): keenlm's tokenizers add no BOS or other
    # token to a prompt, so both values give the same ids; special tokens written in the
    # text (<|im_end|>) are read as their ids, as /v1/completions reads a text prompt
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]
