import json
from pathlib import Path

import pytest

import eval.lm_eval as le
from core.io import read_jsonl
from eval.scores import read_scores


def _run_fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        le.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.slow
def test_embedded_model_on_both_shipped_tasks_with_its_chat_template(
    embedded_path, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "lm_eval"
    tasks = "tasks=magpie_mini_mc,magpie_mini_gen"
    argv = ["model=embedded", tasks, "limit=8", "log_samples=true", f"output_dir={out}"]
    le.main(argv)
    # lm-eval's own layout, found by lm-eval's own utilities
    from lm_eval.utils import get_file_task_name, get_results_filenames

    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    (found,) = get_results_filenames([str(p) for p in out.rglob("*.json")])
    results = json.loads(Path(found).read_text())
    assert set(results["task_hashes"]) == {"magpie_mini_mc", "magpie_mini_gen"}
    sample_files = [f for f in files if "/samples_" in f]
    assert sorted(get_file_task_name(f.split("/")[-1]) for f in sample_files) == [
        "magpie_mini_gen",
        "magpie_mini_mc",
    ]
    assert set(results["results"]) == {"magpie_mini_mc", "magpie_mini_gen"}
    assert all(n["effective"] == 8 for n in results["n-samples"].values())
    assert "<|im_start|>" in results["chat_template"] and results["chat_template_sha"]
    assert "samples" not in results
    for task in ("magpie_mini_mc", "magpie_mini_gen"):  # every prompt went through the chat template
        (path,) = out.glob(f"*/samples_{task}_*.jsonl")
        samples = read_jsonl(path)  # one per document and filter
        # lm-eval's sample files spell each request's arguments {"gen_args_0": {"arg_0": prompt, ...}}
        prompts = {s["doc_id"]: s["arguments"]["gen_args_0"]["arg_0"] for s in samples}.values()
        assert len(prompts) == 8 and all(p.startswith("<|im_start|>system") for p in prompts)
        assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)

    rows = {(r["benchmark"], r["metric"]): r for r in read_scores(out / "scores.jsonl")}
    assert set(rows) == {
        ("magpie_mini_mc", "acc"),
        ("magpie_mini_gen", "exact_match,strict-match"),
        ("magpie_mini_gen", "exact_match,flexible-extract"),
    }
    for r in rows.values():
        assert r["model"] == "SmolLM2-135M-Instruct" and 0.0 <= r["value"] <= 100.0
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    assert "| SmolLM2-135M-Instruct | magpie_mini_mc | acc |" in capsys.readouterr().out

    # The same command again reuses lm-eval's results file instead of evaluating again.
    monkeypatch.setattr("lm_eval.simple_evaluate", lambda **_: pytest.fail("evaluated again"))
    assert {(r["benchmark"], r["metric"]) for r in le.main(argv)} == set(rows)


@pytest.mark.slow
def test_few_shot_examples_become_chat_turns(embedded_path, tmp_path):
    out = tmp_path / "fewshot"
    le.main(["tasks=magpie_mini_mc", "limit=2", "num_fewshot=2", "log_samples=true", f"output_dir={out}"])
    (path,) = out.glob("*/samples_magpie_mini_mc_*.jsonl")
    prompt = json.loads(path.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.count("<|im_start|>user") == 3 and prompt.count("<|im_start|>assistant") == 3


@pytest.mark.integration
def test_unknown_task_names_the_closest_ones(tmp_path, capsys):
    err = _run_fails(["tasks=magpie_mini_mcq", f"output_dir={tmp_path / 'x'}"], capsys)
    assert "unknown lm-eval task 'magpie_mini_mcq'" in err and "magpie_mini_mc" in err
    assert not (tmp_path / "x").exists()  # nothing is claimed before the inputs check out


def test_a_model_that_is_not_a_checkpoint_fails_clearly(tmp_path, capsys):
    assert "no checkpoint directory at" in _run_fails([f"model={tmp_path / 'missing'}"], capsys)
    assert "has no config.json" in _run_fails([f"model={tmp_path}"], capsys)
    assert "runs/sft/merged" in _run_fails(["model=runs/sft/merged"], capsys)  # a path, not a Hub id
    assert "nor a Hub model in the cache" in _run_fails(["model=nobody/no-such-model"], capsys)  # offline


def test_score_rows_from_lm_eval_results():
    results = {
        "results": {
            "mmlu": {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"acc,none": 0.4, "acc_stderr,none": 0.02},
            "wikitext": {"word_perplexity,none": 20.5, "word_perplexity_stderr,none": "N/A"},
            "gsm8k": {"exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05},
            "tiny": {"acc,none": 0.05, "acc_stderr,none": 0.05},
        },
        "group_subtasks": {"mmlu": ["mmlu_anatomy"], "wikitext": [], "gsm8k": [], "tiny": []},
    }
    rows = {(r["benchmark"], r["metric"]): r for r in le.score_rows("m", results)}
    assert set(rows) == {
        ("mmlu", "acc"),
        ("wikitext", "word_perplexity"),
        ("gsm8k", "exact_match,strict-match"),
        ("tiny", "acc"),
    }
    values = {k: (r["value"], r["ci_low"], r["ci_high"]) for k, r in rows.items()}
    assert values["mmlu", "acc"] == pytest.approx((50.0, 48.04, 51.96))  # in %, the group's subtask left out
    assert values["wikitext", "word_perplexity"] == (
        20.5,
        None,
        None,
    )  # its own scale; no stderr, no interval
    assert values["gsm8k", "exact_match,strict-match"] == pytest.approx((25.0, 15.2, 34.8))
    assert values["tiny", "acc"] == pytest.approx((5.0, 0.0, 14.8))  # a percentage interval stays in [0, 100]
