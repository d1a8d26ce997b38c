"""The judge prompts, one text file each beside this one, so they read (and diff) as the judge sees them.

A file is the prompt exactly, but for its final newline (so an editor's newline changes nothing; `urial.txt` ends
with a blank line because its prompt ends with one). `{instruction}` and `{response}` are filled in one pass, so a
brace in the text, or a placeholder inside an instruction, stays as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{(instruction|response)\}")


def prompt(name: str) -> str:
    """The template `<name>.txt`."""
    return (Path(__file__).parent / f"{name}.txt").read_text(encoding="utf-8").removesuffix("\n")


def fill(template: str, instruction: str, response: str = "") -> str:
    values = {"instruction": instruction, "response": response}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


QUALITY = prompt("quality")  # Magpie's input-quality prompt
DIFFICULTY = prompt("difficulty")  # Magpie's difficulty prompt
TASK_CATEGORY = prompt("task_category")  # Magpie's task-category prompt
REWARD = prompt("reward")  # a judge's 1-10 score, where no reward model is configured
ALPAGASUS = prompt("alpagasus")  # AlpaGasus's 0-5 rating
URIAL = prompt("urial")  # URIAL's in-context alignment of a base model
CURATION = prompt("curation")  # Humpback's self-curation prompt (Li et al. 2023, Table 1 of v1), verbatim
SAFETY = prompt("safety")  # a judge's yes/no, where no guard model is configured
