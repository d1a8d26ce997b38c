"""The whole curation chain on data the embedded model makes: magpie_demo -> tag -> select -> pairs -> report."""

import json

import datasets
import pytest
from PIL import Image

from data_synth import magpie, pairs, report, select, tag

pytestmark = pytest.mark.integration  # runs every stage on the embedded model


def test_magpie_tag_select_pairs_report(tmp_path):
    d = tmp_path
    magpie.main(
        [
            "recipe=magpie_demo",
            "n_conversations=6",
            f"output_dir={d / 'raw'}",
            "instruction.max_tokens=48",
            "response.max_tokens=40",
            "chunk_size=6",
        ]
    )
    tag.main(
        [
            "recipe=tag_demo",
            f"input={d / 'raw'}",
            f"output_dir={d / 'tagged'}",
            "judge.max_tokens=48",
            "judge.retries=0",
        ]
    )
    select.main(["recipe=demo_select", f"input={d / 'tagged'}", f"output_dir={d / 'selected'}", "top_k=4"])
    pairs.main(
        [
            "recipe=demo_pairs",
            f"input={d / 'selected'}",
            f"output_dir={d / 'pairs'}",
            "n_samples=2",
            "max_tokens=24",
            "test_size=0.25",
        ]
    )
    report.main(
        [
            "recipe=demo_report",
            f"input={d / 'tagged'}",
            f"compare={d / 'selected'}",
            f"output_dir={d / 'report'}",
        ]
    )

    tagged = datasets.load_dataset("parquet", data_dir=str(d / "tagged"), split="train")
    assert len(tagged) == 6 and {"input_quality", "instruct_reward", "cluster_id", "language"} <= set(
        tagged.column_names
    )
    selected = datasets.load_dataset("parquet", data_dir=str(d / "selected"), split="train")
    steps = json.loads((d / "selected" / "manifest.json").read_text())["steps"]
    assert steps[0]["remaining"] == 6 and steps[-1]["remaining"] == len(selected) <= 4
    lengths = [r["response_length"] for r in selected]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    summary = json.loads((d / "pairs" / "manifest.json").read_text())
    assert summary["prompts"] == len(selected) and summary["pairs"] + summary["ties_dropped"] == len(selected)
    card = (d / "report" / "README.md").read_text()
    assert "6 conversations" in card and "![coverage](coverage.png)" in card
    for png in ("task_categories.png", "quality_difficulty.png", "reward.png", "lengths.png", "coverage.png"):
        with Image.open(d / "report" / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
