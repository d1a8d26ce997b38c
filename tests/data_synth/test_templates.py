import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from data_synth.templates import TemplateError, pre_query

SMOLLM2 = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n"


def test_smollm2_pre_query_template_keeps_its_default_system_prompt(embedded_path):
    pq = pre_query(AutoTokenizer.from_pretrained(embedded_path))
    assert pq.pre_query_template == SMOLLM2
    assert pq.prompt_prefix == SMOLLM2  # ChatML renders its own first token; nothing is added
    assert pq.stop[0] == "<|im_end|>" and pq.stop_token_ids[0] == 2


def test_steering_system_prompt_replaces_the_default(embedded_path):
    pq = pre_query(AutoTokenizer.from_pretrained(embedded_path), "You are a math tutor.")
    assert pq.pre_query_template == "<|im_start|>system\nYou are a math tutor.<|im_end|>\n<|im_start|>user\n"


def test_model_without_chat_template_fails_naming_it(embedded_path):
    tok = AutoTokenizer.from_pretrained(embedded_path)
    tok.chat_template = None
    tok.name_or_path = "my-base-model"
    with pytest.raises(TemplateError, match=r"model 'my-base-model' has no chat template: Magpie needs"):
        pre_query(tok)


@pytest.mark.integration
def test_cli_prints_one_json_object():
    out = subprocess.run(
        [sys.executable, "-m", "data_synth.templates", "tokenizer=embedded"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["pre_query_template"] == SMOLLM2 and "<|im_end|>" in data["stop"]


# The reference table: (pre-query template as rendered, what engines receive, stops that must be there)
EXPECTED = {
    "llama3": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
        None,
        ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"],
    ),
    "qwen2": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
        None,
        ["<|im_end|>", "<|endoftext|>"],
    ),
    "qwen2_5": (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n",
        None,
        ["<|im_end|>"],
    ),
    "phi3": ("<|user|>\n", "<s><|user|>\n", ["<|end|>"]),  # the tokenizer adds <s>: once, here
    "gemma2": ("<bos><start_of_turn>user\n", None, ["<end_of_turn>"]),  # rendered BOS: not doubled
    "mistral_v03": ("<s>[INST] ", None, ["</s>"]),
}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, embedded_path):
    from tests.fixtures.chat_families import FAMILIES, family_tokenizer

    d = tmp_path_factory.mktemp("families")
    return {name: family_tokenizer(name, embedded_path, d) for name in FAMILIES}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_family_pre_query_templates_match_the_reference(family, family_dir):
    template, prefix, stops = EXPECTED[family]
    tok = AutoTokenizer.from_pretrained(family_dir[family])
    pq = pre_query(tok)
    assert pq.pre_query_template == template
    assert pq.prompt_prefix == (prefix or template)
    assert set(stops) <= set(pq.stop)
    assert pq.stop_token_ids == [tok.convert_tokens_to_ids(s) for s in pq.stop]
    # What the engine tokenizes (without special tokens) holds exactly one BOS where the model expects one.
    ids = tok(pq.prompt_prefix, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_steering_puts_the_system_prompt_where_each_family_expects_it(family_dir):
    load = lambda f: AutoTokenizer.from_pretrained(family_dir[f])  # noqa: E731
    assert pre_query(load("llama3"), "SYS").pre_query_template == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert pre_query(load("mistral_v03"), "SYS").pre_query_template == "<s>[INST] SYS\n\n"
    with pytest.raises(TemplateError, match=r"gemma2.*System role not supported"):
        pre_query(load("gemma2"), "SYS")


def test_follow_up_turn_template_includes_the_history(family_dir):
    tok = AutoTokenizer.from_pretrained(family_dir["llama3"])
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    pq = pre_query(tok, "MT", history)
    assert pq.pre_query_template.endswith("Hello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n")
    assert pq.pre_query_template.startswith(
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nMT"
    )
