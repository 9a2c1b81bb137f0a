"""OpenAI's request bodies as `serve` honours them, and the text a token stream becomes.

Fields the server cannot honour with another value than the default (n, top_p, logprobs) are rejected with 422 rather
than ignored; unknown fields (user, logit_bias, ...) are ignored, as OpenAI-compatible servers do; null means default.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator

from antinet_npu import AntinetError
from antinet_npu.runtime.generation import Sampling

MAX_STOP_CHARS = 256


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text has an unpaired surrogate at character {exc.start}: send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = False


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = Field(None, description="ignored: the server runs one model")
    max_tokens: Optional[int] = Field(None, ge=1, description="new tokens at most (default 16)")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="the current name of max_tokens; wins")
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy; "
                                         "default 1")
    seed: Optional[int] = Field(None, description="sampling seed (temperature > 0): the same seed, the same text")
    stop: Union[Text, list[Text], None] = Field(None, description="stop sequences (not included in the text)")
    stream: Optional[bool] = Field(False, description="server-sent events, one per text delta, then [DONE]")
    stream_options: Optional[StreamOptions] = Field(None, description="include_usage: a last chunk with usage")
    n: Optional[int] = Field(None, description="only 1")
    top_p: Optional[float] = Field(None, allow_inf_nan=False, description="only 1")

    @model_validator(mode="after")
    def _only_defaults(self):
        if self.n not in (None, 1):
            raise ValueError("n must be 1: this server returns one choice per prompt")
        if self.top_p not in (None, 1):
            raise ValueError("top_p must be 1: this server samples from the full distribution (use temperature)")
        return self

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16

    def stops(self, max_stop: int) -> list[str]:
        """Non-empty stop strings (an empty one would stop every answer before it starts: ignored)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > max_stop:
            raise AntinetError(f"stop has {len(stops)} sequences, at most {max_stop} are allowed (serve.max_stop)")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise AntinetError(f"a stop sequence is longer than {MAX_STOP_CHARS} characters")
        return [s for s in stops if s]

    def sampling(self) -> Sampling:
        temperature = 1.0 if self.temperature is None else self.temperature
        # any integer seeds (OpenAI's are signed); numpy's generator takes non-negative ones
        return Sampling(temperature=temperature, seed=None if self.seed is None else self.seed % 2**64)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampled):
    prompt: Union[Text, list[Text], list[StrictInt], list[list[StrictInt]]] = Field(
        ..., description="text, a list of texts, token ids, or a list of token-id lists: one choice each")
    logprobs: Optional[int] = Field(None, description="not supported: leave it out")
    echo: Optional[bool] = Field(None, description="not supported: leave it out")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs:
            raise ValueError("logprobs is not supported by this server: leave it out (or use /api/infer, which "
                             "returns the next token's top-k log-probabilities)")
        if self.echo:
            raise ValueError("echo is not supported by this server: leave it out")
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt is an empty list: give at least one prompt")
        return self

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[Text, list[TextPart], None] = Field(..., description="text, or a list of text parts")

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(_Sampled):
    messages: list[Message] = Field(..., min_length=1)
    logprobs: Optional[bool] = Field(None, description="not supported: leave it out")
    top_logprobs: Optional[int] = Field(None, description="not supported: leave it out")

    @model_validator(mode="after")
    def _unsupported(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported by this server: leave it out")
        return self


class InferRequest(BaseModel):
    text: Optional[Text] = Field(None, description="prompt text (tokenized with the model's tokenizer)")
    token_ids: Optional[list[StrictInt]] = Field(None, description="prompt token ids (instead of text)")
    top_k: int = Field(5, ge=1, le=100, description="how many next-token candidates to return")
    max_new_tokens: int = Field(0, ge=0, description="greedy continuation length")

    @model_validator(mode="after")
    def one_prompt(self):
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of text or token_ids")
        return self


class TextAssembler:
    """Tokens in, text deltas out. Text is decoded from all tokens so far and released only when it cannot change:
    not inside an incomplete UTF-8 character, not a possible start of a stop string. So the deltas concatenate to the
    full answer, cut before the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that is safe to send; sets `stopped` when a stop string appeared (the text before it)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(len(self.sent) - len(s), 0)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(text[:min(hits)])
        safe = len(text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._release(text[:safe]) if safe > len(self.sent) else ""

    def finish(self) -> str:
        """What was held back, once no token will follow."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        delta, self.sent = upto[len(self.sent):], upto
        return delta
