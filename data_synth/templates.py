"""Magpie's pre-query template, derived by rendering a tokenizer's own chat template.

The pre-query template is what the chat template renders before the user's content of a single user
message. Rendering (rather than a hard-coded table) keeps injected default system prompts (Qwen2.5,
SmolLM2), trimming (Llama-3) and `[INST]` wrapping (Mistral) exactly as the model saw them in training.

    python -m data_synth.templates tokenizer=PATH_OR_HUB_ID [system_prompt=TEXT]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from core.chat import tokenizer_adds_bos, with_bos
from core.config import ConfigError, cli, load_config

_SENTINEL_USER = "MAGPIE_SENTINEL_USER_7f3a"
_SENTINEL_ASSISTANT = "MAGPIE_SENTINEL_ASSISTANT_7f3a"


class TemplateError(ConfigError):
    """A tokenizer whose chat template cannot give Magpie a pre-query template."""


@dataclass
class PreQuery:
    pre_query_template: str  # rendered text before the user's content
    prompt_prefix: str  # what engines receive: the template plus a BOS the tokenizer would add at encode time
    stop: list[str] = field(default_factory=list)  # end-of-turn markers (and eos)
    stop_token_ids: list[int] = field(default_factory=list)
    bos_added_by_tokenizer: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "pre_query_template": self.pre_query_template,
            "prompt_prefix": self.prompt_prefix,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "bos_added_by_tokenizer": self.bos_added_by_tokenizer,
        }


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _render(tokenizer: Any, messages: list[dict[str, str]], **kwargs: Any) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"model '{_name(tokenizer)}' has no chat template: Magpie needs an aligned (chat) model whose "
            "template it can render up to the user's message"
        )
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja raises its own TemplateError, e.g. "System role not supported"
        roles = "+".join(m["role"] for m in messages)
        raise TemplateError(
            f"model '{_name(tokenizer)}': its chat template cannot render a {roles} conversation ({e})"
        ) from e


def _special_tokens(tokenizer: Any) -> list[str]:
    tokens = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    return sorted((t for t in tokens if t), key=len, reverse=True)


def _leading_specials(text: str, specials: list[str]) -> list[str]:
    found, rest = [], text.strip()
    while rest:
        hit = next((s for s in specials if rest.startswith(s)), None)
        if hit is None:
            break
        found.append(hit)
        rest = rest[len(hit) :].strip()
    return found


def stop_markers(tokenizer: Any) -> list[str]:
    """Where a generated turn ends: the special tokens the template writes after a turn's content (<|eot_id|>,
    <|im_end|>, <end_of_turn>), the eos and end-of-text tokens, and the token opening the next turn's header
    (<|start_header_id|>, <|im_start|>): a model that runs past its end marker must not write the next turn."""
    specials = _special_tokens(tokenizer)
    pair = [
        {"role": "user", "content": _SENTINEL_USER},
        {"role": "assistant", "content": _SENTINEL_ASSISTANT},
    ]
    after_assistant = _render(tokenizer, pair).split(_SENTINEL_ASSISTANT, 1)[-1]
    plain = _render(tokenizer, pair[:1])
    after_user = plain.split(_SENTINEL_USER, 1)[-1]
    header = _render(tokenizer, pair[:1], add_generation_prompt=True)[len(plain) :]
    stops = _leading_specials(after_assistant, specials) + _leading_specials(after_user, specials)
    stops += [tokenizer.eos_token or ""] + [t for t in specials if "end_of_text" in t or "endoftext" in t]
    stops += _leading_specials(header, specials)[:1]
    return [s for s in dict.fromkeys(stops) if s]


def pre_query(
    tokenizer: Any, system_prompt: str | None = None, history: list[dict[str, str]] | None = None
) -> PreQuery:
    """The pre-query template (optionally after a steering system prompt and earlier turns) and the stop markers.

    With `history`, it is everything before the next user turn's content: how Magpie-MT samples follow-ups.
    """
    messages = [*(history or []), {"role": "user", "content": _SENTINEL_USER}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = _render(tokenizer, messages)
    if text.count(_SENTINEL_USER) != 1:
        raise TemplateError(
            f"model '{_name(tokenizer)}': its chat template does not place the user's message verbatim once "
            f"(found it {text.count(_SENTINEL_USER)} times), so it cannot be split into a pre-query template"
        )
    template = text.split(_SENTINEL_USER, 1)[0]
    if not template:
        raise TemplateError(
            f"model '{_name(tokenizer)}': its chat template renders nothing before the user's message"
        )
    stops = stop_markers(tokenizer)
    stop_ids = []
    for s in stops:
        ids = tokenizer.convert_tokens_to_ids(s)
        if isinstance(ids, int) and tokenizer.convert_ids_to_tokens(ids) == s:  # not a fallback to <unk>
            stop_ids.append(ids)
    return PreQuery(template, with_bos(tokenizer, template), stops, stop_ids, tokenizer_adds_bos(tokenizer))


@dataclass
class TemplatesConfig:
    tokenizer: str = "embedded"
    system_prompt: str | None = None
    trust_remote_code: bool = False


@cli
def main(argv: list[str] | None = None) -> None:
    from core.engines import EngineConfig, load_tokenizer

    (cfg,) = load_config("magpie", argv, TemplatesConfig)
    tok = load_tokenizer(cfg.tokenizer, EngineConfig(trust_remote_code=cfg.trust_remote_code))
    print(json.dumps(pre_query(tok, cfg.system_prompt).to_dict(), ensure_ascii=False))


if __name__ == "__main__":
    main()
