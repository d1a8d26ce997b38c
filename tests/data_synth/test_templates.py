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


def test_cli_prints_one_json_object():
    out = subprocess.run(
        [sys.executable, "-m", "data_synth.templates", "tokenizer=embedded"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["pre_query_template"] == SMOLLM2 and "<|im_end|>" in data["stop"]
