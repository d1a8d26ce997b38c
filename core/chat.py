"""Conversations: validation of `messages` rows and training chat templates with `{% generation %}` markers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.config import ConfigError

TEMPLATES_DIR = Path(__file__).parent / "chat_templates"
ROLES = ("system", "user", "assistant")


class ConversationError(ConfigError):
    """A row that is not a valid conversation."""


def check_messages(messages: Any, where: str) -> None:
    """`where` names the row (file and index) in the error. Rules: optional system first, then user/assistant
    alternating starting with user, ending with a non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError(
            f"{where}: 'messages' must be a non-empty list, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"{where}: message {i} must have 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ConversationError(f"{where}: message {i} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ConversationError(f"{where}: message {i} content must be a string")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConversationError(
                f"{where}: roles out of order: turn {i} is {m['role']!r}, expected {expected!r}"
            )
        if expected == "assistant" and not m["content"].strip():
            raise ConversationError(f"{where}: assistant turn {i} is empty")
    if not turns or turns[-1]["role"] != "assistant":
        raise ConversationError(f"{where}: the conversation must end with an assistant turn")


# ShareGPT-style speaker names (ShareGPT, Evol-Instruct V2, OpenHermes, Magpie's releases) -> chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "assistant": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}


def sharegpt_to_messages(conversations: Any, where: str) -> list[dict[str, str]]:
    """`[{"from": "human"|"gpt"|"system", "value": ...}]` -> `[{"role", "content"}]`; unknown speakers fail.
    Our own because trl's `maybe_convert_to_chatml` renames the keys but keeps the speakers as roles ("human",
    "gpt", "bing"), which no chat template knows, and passes malformed turns on."""
    if not isinstance(conversations, list):
        raise ConversationError(
            f"{where}: 'conversations' must be a list, got {type(conversations).__name__}"
        )
    messages = []
    for i, turn in enumerate(conversations):
        speaker = str(turn.get("from", "")).lower() if isinstance(turn, dict) else ""
        if speaker not in SHAREGPT_ROLES or not isinstance(turn.get("value"), str):
            raise ConversationError(f"{where}: turn {i} has speaker {speaker!r} or a non-text value")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn["value"]})
    return messages


# Every column `to_messages` may read: select these to stream conversations without a row's other columns
CONVERSATION_COLUMNS = (
    "messages",
    "conversation",
    "conversations",
    "instruction",
    "input",
    "response",
    "output",
)


def to_messages(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A row's conversation as chat messages, from any layout the harness reads: `messages`; `conversation`
    (WildChat: role/content turns with metadata); `conversations` (ShareGPT and the Magpie authors' releases,
    from/value); `instruction` + `response` (the Magpie authors' releases); `instruction` (+ `input`) + `output`
    (Alpaca). ConfigError when it has none."""
    # `get`, not `in`: a file mixing schemas loads with every column, missing ones as None.
    for column in ("messages", "conversation"):
        if row.get(column) is not None:
            return _role_content(row[column], column, where)
    if row.get("conversations") is not None:
        return sharegpt_to_messages(row["conversations"], where)
    reply = row.get("response", row.get("output"))
    if isinstance(row.get("instruction"), str) and isinstance(reply, str):
        prompt = row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    raise ConversationError(
        f"{where}: no conversation (expected messages, conversation, conversations, instruction/response or "
        f"instruction/output; columns: {sorted(row)})"
    )


def _role_content(turns: Any, column: str, where: str) -> list[dict[str, str]]:
    """A column of {role, content} turns (extra keys such as WildChat's metadata dropped); anything else fails."""
    if not isinstance(turns, list):
        raise ConversationError(
            f"{where}: '{column}' must be a list of {{role, content}} messages, got {type(turns).__name__} "
            f"{str(turns)[:40]!r}"
        )
    for i, t in enumerate(turns):
        if not (isinstance(t, dict) and "role" in t and "content" in t):
            raise ConversationError(
                f"{where}: '{column}' item {i} must be a {{role, content}} message, got {str(t)[:40]!r}"
            )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def first_turn(row: dict[str, Any], where: str = "a row") -> tuple[str, str]:
    """(instruction, response): the first user turn and the assistant turn after it, in any layout."""
    messages = to_messages(row, where)
    user = next((i for i, m in enumerate(messages) if m.get("role") == "user"), None)
    if user is None:
        raise ConversationError(
            f"{where}: the conversation has no user turn (roles: {[m.get('role') for m in messages]})"
        )
    reply = next((m["content"] for m in messages[user + 1 :] if m["role"] == "assistant"), "")
    return messages[user]["content"], reply


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding text adds a BOS token (Llama-2, Phi-3 style) rather than the template rendering it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("hello", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def with_bos(tokenizer: Any, text: str) -> str:
    """Engines add no special tokens, so raw text gets the BOS the tokenizer would add at encode time: once, and
    never twice (text that already starts with it, e.g. a rendered Llama-3 template, is left alone)."""
    bos = tokenizer.bos_token or ""
    if bos and not text.startswith(bos) and tokenizer_adds_bos(tokenizer):
        return bos + text
    return text


def render_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A chat rendered with its generation prompt as raw text carrying exactly one BOS (engines add none)."""
    return with_bos(
        tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def training_chat_template(tokenizer: Any) -> str | None:
    """A chat template with `{% generation %}` markers for assistant-only loss, or None if the current one has them.

    trl ships training templates for many families (Llama-3, Qwen2.5, Phi-3, Gemma, ...); SmolLM2's ChatML with
    its injected system prompt is not among them, so the project ships that one.
    """
    template = getattr(tokenizer, "chat_template", None) or ""
    if "{% generation %}" in template or "{%- generation -%}" in template:
        return None
    if "named SmolLM, trained by Hugging Face" in template:
        return (TEMPLATES_DIR / "smollm2_training.jinja").read_text()
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except ValueError as e:
        raise ConversationError(
            f"{getattr(tokenizer, 'name_or_path', 'tokenizer')}: no training chat template with {{% generation %}} "
            f"markers is known for this chat template ({e}); set chat_template=PATH to a .jinja file that has them, "
            "or assistant_only_loss=false"
        ) from None


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """The special token the chat template closes an assistant turn with (<|eot_id|>, <|im_end|>, <end_of_turn>).
    A base model tuned on a chat template keeps its own eos (Llama-3-8B: <|end_of_text|>), so generation must be
    told to stop here too, or answers run on to max_tokens through the next turn's headers."""
    if not tokenizer.chat_template:
        return []
    marker = "Zq7Xw"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    ids = tokenizer(text[text.rindex(marker) + len(marker) :], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return ids[:1] if ids and ids[0] in special else []


def instruction_of(row: dict[str, Any], where: str = "a row") -> str:
    """The instruction a row asks, with or without a response: `instruction` (+ Alpaca's `input`), as the Magpie
    authors' instruction sets and DPO inputs hold it with tags and no response; `prompt` (text, or trl's chat
    messages); else the first user turn of its conversation."""
    if isinstance(row.get("instruction"), str):
        return row["instruction"] if not row.get("input") else f"{row['instruction']}\n\n{row['input']}"
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        user = [m for m in _role_content(prompt, "prompt", where) if m["role"] == "user"]
        if user:
            return user[0]["content"]
    return first_turn(row, where)[0]
