"""Tagging: the columns Magpie filters on (`python -m data_synth.tag`, see command.py).

    command.py   TagConfig, the driver (resumable shards per tagger, keyed by row content) and the merge
    taggers.py   every tagger, by kind, and the TAGGERS registry
    context.py   what taggers share: models built on first use, the tags already written
    parse.py     reading the judge's replies
    neighbors.py embeddings, FAISS neighbours, near-duplicate clusters
The judge prompts are text files in data_synth/prompts/, the label sets in data_synth/labels.py, and the reward
scorer (shared with data_synth.pairs) in data_synth/scoring.py.
"""

from data_synth.labels import DIFFICULTY, QUALITY, TASK_CATEGORIES
from data_synth.scoring import RewardModel
from data_synth.tag.command import TagConfig, main, merge, row_keys, run
from data_synth.tag.context import Context, aligned_tags
from data_synth.tag.neighbors import neighbor_tags
from data_synth.tag.parse import (
    parse_category,
    parse_curation,
    parse_difficulty,
    parse_judgment,
    parse_quality,
    read_curation_probabilities,
)
from data_synth.tag.taggers import MAGPIE_TAGGERS, TAGGERS, Tagger, in_order

__all__ = [
    "DIFFICULTY",
    "MAGPIE_TAGGERS",
    "QUALITY",
    "TAGGERS",
    "TASK_CATEGORIES",
    "Context",
    "RewardModel",
    "TagConfig",
    "Tagger",
    "aligned_tags",
    "in_order",
    "main",
    "merge",
    "neighbor_tags",
    "parse_category",
    "parse_curation",
    "parse_difficulty",
    "parse_judgment",
    "parse_quality",
    "read_curation_probabilities",
    "row_keys",
    "run",
]
