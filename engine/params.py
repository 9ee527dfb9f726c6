"""Request-level sampling settings (host side) and their validation."""

from __future__ import annotations

import dataclasses
import math
import os


DEFAULT_MAX_TOKENS = 2048
MAX_CHOICES = 128  # the most choices (`n`) a request may ask for
DRY_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's default sequence breakers
MAX_BREAKERS = 64
INT32_MAX = 2**31 - 1
OPENAI_DEFAULTS = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, typical_p=1.0, repetition_penalty=1.0)


def default_settings(generation_config: dict) -> dict:
    """The defaults in force for a model: its generation_config's sampling values where present, else OpenAI's."""
    out = {}
    for k, v in OPENAI_DEFAULTS.items():
        g = generation_config.get(k)
        out[k] = type(v)(g) if isinstance(g, (int, float)) and not isinstance(g, bool) else v
    return out


CONTEXT = "context_length_exceeded"  # the code of a prompt past the context (OpenAI's; clients compact on it)


class InvalidRequest(ValueError):
    """A request setting out of range; `param` names the field, `code` the kind where clients read it
    (`context_length_exceeded`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass
class SamplingParams:
    """Everything a request may set. `None` means: the model's generation_config default, else the OpenAI one."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    ignore_eos: bool = False
    mirostat_target: float | None = None
    mirostat_lr: float = 0.1
    seed: int | None = None
    n: int = 1
    stop: list[str] = dataclasses.field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    # the logprobs report the distribution drawn from, after every transform (llama.cpp's `post_sampling_probs`)
    post_sampling_probs: bool = False
    echo: bool = False  # also return the prompt's logprobs
    skip_special_tokens: bool = True  # special tokens' text (EOS aside) left out of the reply
    min_tokens: int = 0  # tokens drawn before EOS or a stop token may be (stop strings wait as long)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)  # token ids that end a choice, as EOS does
    include_stop_str_in_output: bool = False  # the stop string that ended a choice stays in its text
    allowed_token_ids: list[int] | None = None  # the only tokens a choice may draw (None: any)
    bad_words: list[str] = dataclasses.field(default_factory=list)  # vLLM's: words never completed (as it tokenizes)
    dry_multiplier: float = 0.0  # llama.cpp's DRY (0: off), its base, allowed length, window and sequence breakers
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1  # -1: as far back as DRY looks (llama.cpp: the whole context); 0: off
    dry_sequence_breakers: list[str] = dataclasses.field(default_factory=lambda: list(DRY_BREAKERS))
    top_n_sigma: float = -1.0  # llama.cpp's top-nσ (<= 0: off)
    xtc_probability: float = 0.0  # llama.cpp's XTC (0: off) and its threshold
    xtc_threshold: float = 0.1
    dynatemp_range: float = 0.0  # llama.cpp's dynamic temperature (0: off): temperature +- this, by the entropy
    dynatemp_exponent: float = 1.0
    n_indent: int = 0  # llama.cpp's (code completion): a new line indented by fewer blanks ends the reply (0: off)
    t_max_predict_ms: int = 0  # llama.cpp's: past this many ms since the first token, a new line ends it (<= 0: off)

    def resolved(self, defaults: dict) -> "SamplingParams":
        """A copy with unset values filled from `defaults` (generation_config) or the OpenAI defaults."""
        out = dataclasses.replace(self)
        for k, v in default_settings(defaults).items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        if out.seed is None:
            out.seed = int.from_bytes(os.urandom(4), "little")
        out.validate()
        return out

    def validate(self) -> None:
        """Raise `InvalidRequest` for a value out of range."""
        def check(ok, msg, param):
            if not ok:
                raise InvalidRequest(msg, param)

        check(self.temperature is None or 0.0 <= self.temperature < math.inf, "temperature must be a number >= 0",
              "temperature")  # (the OpenAI API's bound, 2, is the server's: `server.protocol.NUMBERS`)
        check(self.top_p is None or 0.0 <= self.top_p <= 1.0, "top_p must be in [0, 1]", "top_p")
        check(self.top_k is None or self.top_k >= 0, "top_k must be >= 0", "top_k")
        check(self.min_p is None or 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]", "min_p")
        check(self.typical_p is None or 0.0 < self.typical_p <= 1.0, "typical_p must be in (0, 1]", "typical_p")
        check(self.repetition_penalty is None or 0.0 < self.repetition_penalty <= 2.0,
              "repetition_penalty must be in (0, 2]", "repetition_penalty")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]", "frequency_penalty")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]", "presence_penalty")
        check(1 <= self.n <= MAX_CHOICES, f"n must be in [1, {MAX_CHOICES}]", "n")
        check(self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0", "max_tokens")
        check(0 <= self.top_logprobs <= 20, "top_logprobs must be in [0, 20]", "top_logprobs")
        check(self.mirostat_target is None or self.mirostat_target > 0, "mirostat_target must be > 0",
              "mirostat_target")
        check(self.mirostat_lr > 0, "mirostat_lr must be > 0", "mirostat_lr")
        for t, b in self.logit_bias.items():
            check(-100.0 <= b <= 100.0, "logit_bias values must be in [-100, 100]", "logit_bias")
        check(self.min_tokens >= 0, "min_tokens must be >= 0", "min_tokens")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
              f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})", "min_tokens")
        check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words must be non-empty strings",
              "bad_words")
        check(self.dry_multiplier >= 0.0, "dry_multiplier must be >= 0", "dry_multiplier")
        check(self.dry_base >= 1.0, "dry_base must be >= 1", "dry_base")
        check(self.dry_allowed_length >= 0, "dry_allowed_length must be >= 0", "dry_allowed_length")
        check(self.dry_penalty_last_n >= -1, "dry_penalty_last_n must be >= -1", "dry_penalty_last_n")
        check(0 < len(self.dry_sequence_breakers) <= MAX_BREAKERS and all(self.dry_sequence_breakers),
              f"dry_sequence_breakers must hold 1 to {MAX_BREAKERS} non-empty strings", "dry_sequence_breakers")
        check(0.0 <= self.xtc_probability <= 1.0, "xtc_probability must be in [0, 1]", "xtc_probability")
        check(0.0 <= self.xtc_threshold <= 1.0, "xtc_threshold must be in [0, 1]", "xtc_threshold")
        check(self.dynatemp_range >= 0.0, "dynatemp_range must be >= 0", "dynatemp_range")
        check(self.dynatemp_exponent >= 0.0, "dynatemp_exponent must be >= 0", "dynatemp_exponent")

    def sampler_row(self) -> dict:
        """The sampler's per-slot values (neutral where a transform is off; mirostat replaces truncation, top-nσ,
        XTC and the dynamic temperature, as in llama.cpp's chain)."""
        miro = self.mirostat_target is not None
        return dict(
            temperature=self.temperature,
            top_k=0 if miro else min(self.top_k, INT32_MAX),  # past the vocabulary keeps every token, as int32's max
            top_p=1.0 if miro else self.top_p, min_p=0.0 if miro else self.min_p,
            typical_p=1.0 if miro else self.typical_p,
            repetition_penalty=self.repetition_penalty, frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty, mirostat_tau=self.mirostat_target or 5.0,
            mirostat_eta=self.mirostat_lr, mirostat=miro, top_logprobs=self.top_logprobs, min_tokens=self.min_tokens,
            dry_multiplier=self.dry_multiplier if self.dry_penalty_last_n else 0.0, dry_base=self.dry_base,
            dry_allowed_length=min(self.dry_allowed_length, INT32_MAX),
            dry_last_n=min(self.dry_penalty_last_n, INT32_MAX),
            top_n_sigma=-1.0 if miro else self.top_n_sigma, xtc_probability=0.0 if miro else self.xtc_probability,
            xtc_threshold=self.xtc_threshold, dynatemp_range=0.0 if miro else self.dynatemp_range,
            dynatemp_exponent=self.dynatemp_exponent, post_sampling=self.post_sampling_probs)
