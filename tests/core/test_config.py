from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from core.config import ConfigError, build, parse_config
from core.engines import EngineConfig
from core.recipes import available_recipes
from core.rundir import prepare_output_dir


@dataclass
class Inner:
    temperature: float = 1.0
    stop: list[str] = field(default_factory=list)


@dataclass
class Cfg:
    name: str = "x"
    n: int = 3
    rate: float = 0.1
    flag: bool = False
    mode: str | None = None
    inner: Inner = field(default_factory=Inner)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineHolder:
    engine: EngineConfig = field(default_factory=EngineConfig)


def test_overrides_nested_lists_and_int_to_float():
    (cfg,) = build(
        {"n": 5, "rate": 2, "inner": {"temperature": 0, "stop": ["a", "b"]}, "weights": {"x": 1}}, Cfg
    )
    assert cfg.n == 5 and cfg.rate == 2.0 and isinstance(cfg.rate, float)
    assert cfg.inner.temperature == 0.0 and cfg.inner.stop == ["a", "b"]
    assert cfg.weights == {"x": 1.0}


def test_dotted_override_on_a_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("n: 7\ninner:\n  temperature: 0.5\n")
    (cfg,) = parse_config(
        "synth", [f"recipe={recipe}", "inner.temperature=1.2", "rate=1e-5", "inner.stop=x,y"], Cfg
    )
    assert cfg.n == 7 and cfg.inner.temperature == 1.2 and cfg.rate == 1e-5 and cfg.inner.stop == ["x", "y"]


def test_yes_no_on_the_command_line_stay_strings():
    (cfg,) = parse_config("synth", ["name=no", "mode=off", "flag=true"], Cfg)
    assert cfg.name == "no" and cfg.mode == "off" and cfg.flag is True
    with pytest.raises(ConfigError, match="quote the value"):
        build({"name": False}, Cfg)  # what an unquoted `name: no` in a recipe file becomes


def test_unknown_key_names_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'rat'.*Closest valid keys: rate"):
        build({"rat": 1}, Cfg)
    with pytest.raises(ConfigError, match=r"unknown key 'inner.temprature'.*inner.temperature"):
        parse_config("synth", ["inner.temprature=1"], Cfg)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"key 'n': expected int, got 'many'"):
        parse_config("synth", ["n=many"], Cfg)
    with pytest.raises(ConfigError, match=r"key 'flag': expected bool"):
        build({"flag": "maybe"}, Cfg)
    with pytest.raises(ConfigError, match=r"key 'inner.temperature': expected float"):
        build({"inner": {"temperature": "hot"}}, Cfg)
    with pytest.raises(
        ConfigError, match=r"key 'engine.backend': expected one of \['transformers', 'openai', 'vllm'\]"
    ):
        build({"engine": {"backend": "tgi"}}, EngineHolder)


def test_unknown_recipe_lists_available():
    with pytest.raises(
        ConfigError, match=r"unknown magpie recipe 'magpie_dmeo'.*Did you mean: magpie_demo.*magpie_demo"
    ):
        parse_config("magpie", ["recipe=magpie_dmeo"], Cfg)
    assert "magpie_demo" in available_recipes("magpie")


def test_trl_config_validates_keys_and_types():
    from trl import SFTConfig

    with pytest.raises(ConfigError, match=r"unknown key 'learnin_rate'.*learning_rate"):
        build({"learnin_rate": 1e-5}, SFTConfig)
    with pytest.raises(ConfigError, match=r"key 'learning_rate': expected float"):
        build({"learning_rate": "fast"}, SFTConfig)
    (args,) = build(
        {"learning_rate": 2e-5, "lr_scheduler_type": "cosine", "report_to": "none", "bf16": False}, SFTConfig
    )
    assert args.learning_rate == 2e-5


def test_output_dir_written_resumed_and_protected(tmp_path):
    out = tmp_path / "run"
    assert prepare_output_dir(out, {"a": 1, "n": 5}, command="test") is False
    assert OmegaConf.load(out / "config.yaml") == {"a": 1, "n": 5}
    (out / "data.parquet").write_text("x")
    assert prepare_output_dir(out, {"a": 1, "n": 5}, command="test") is True  # same config: resume
    assert prepare_output_dir(out, {"a": 1, "n": 9}, may_differ=("n",), command="test") is True
    with pytest.raises(ConfigError, match=r"different config \(a: 1 -> 2\)"):
        prepare_output_dir(out, {"a": 2, "n": 9}, command="test")
    assert (out / "data.parquet").read_text() == "x"  # nothing was touched

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.csv").write_text("precious")
    with pytest.raises(ConfigError, match="no config.yaml"):
        prepare_output_dir(foreign, {"a": 1}, command="test")
    assert (foreign / "results.csv").read_text() == "precious"


def test_a_recipe_can_inherit_from_another(tmp_path, monkeypatch):
    import core.recipes as recipes

    (tmp_path / "synth").mkdir()
    (tmp_path / "synth" / "parent.yaml").write_text("name: parent\nn: 4\ninner:\n  temperature: 0.7\n")
    (tmp_path / "synth" / "child.yaml").write_text("base: parent\nname: child\ninner:\n  stop: [x]\n")
    (tmp_path / "synth" / "loop.yaml").write_text("base: loop\n")
    monkeypatch.setattr(recipes, "RECIPES_DIR", tmp_path)
    (cfg,) = parse_config("synth", ["recipe=child", "n=5"], Cfg)
    assert (cfg.name, cfg.n, cfg.inner.temperature, cfg.inner.stop) == ("child", 5, 0.7, ["x"])
    with pytest.raises(ConfigError, match="inherit in a loop"):
        parse_config("synth", ["recipe=loop"], Cfg)


def test_argv_parsed_and_merged_without_building(tmp_path):
    """What load_config does before `build`, for a command (the memory planner) whose keys are not one schema's."""
    from core.config import parse_argv
    from core.recipes import merge_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("n: 7\ninner:\n  temperature: 0.5\n")
    name, overrides = parse_argv([f"--recipe={recipe}", "save_strategy=no", "inner.stop=[a]", "rate=${n}"])
    assert name == str(recipe) and overrides == {
        "save_strategy": "no",
        "inner": {"stop": ["a"]},
        "rate": "${n}",
    }
    merged = merge_recipe("synth", name, overrides)  # nested groups merge; interpolations see the recipe
    assert merged == {"n": 7, "inner": {"temperature": 0.5, "stop": ["a"]}, "save_strategy": "no", "rate": 7}
    with pytest.raises(ConfigError, match=r"^could not resolve the config: Interpolation key 'm' not found$"):
        merge_recipe("synth", None, parse_argv(["rate=${m}"])[1])


def test_a_malformed_recipe_names_its_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("filters: [1, 2\ntop_k: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: not valid YAML \(did not find expected"):
        parse_config("select", [f"recipe={recipe}"], Cfg)


def test_a_schema_whose_types_cannot_be_resolved_is_our_error_never_unchecked():
    import dataclasses as dc

    @dc.dataclass
    class Broken:
        n: "NoSuchType" = None  # noqa: F821

    with pytest.raises(TypeError, match=r"Broken: its field types cannot be resolved .*NoSuchType"):
        build({"n": 1}, Broken)
