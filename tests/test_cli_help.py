"""Each entry point's --help lists its own flags, with a help text and the defaults of the
chosen --dataset; every choice flag given a bad value ends in one sentence naming it."""
from __future__ import annotations

import dataclasses
import re

import pytest

import main
import main_trans
from config import LATE_FUSION_FIELDS, MID_FUSION_FIELDS, NOT_FLAGS, Config, choices
from utils.cli import run_cli


def help_text(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        module.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_help(text: str, name: str) -> str:
    """The help paragraph of one option in argparse's --help output."""
    match = re.search(rf"^  {re.escape(flag(name))}\b.*?(?=^  -|\Z)", text, re.S | re.M)
    assert match, f"{flag(name)} missing from --help"
    return " ".join(match.group(0).split())


def test_each_entry_point_lists_only_its_own_flags(capsys):
    late = help_text(main, [], capsys)
    mid = help_text(main_trans, [], capsys)
    for name in MID_FUSION_FIELDS:
        assert f"{flag(name)} " not in late, name
    for name in LATE_FUSION_FIELDS:
        assert f"{flag(name)} " not in mid, name
    assert "--fusion FUSION" in late and "--model-type MODEL_TYPE" in mid


@pytest.mark.parametrize("module, skip", [(main, MID_FUSION_FIELDS), (main_trans, LATE_FUSION_FIELDS)])
def test_every_flag_says_what_it_does(capsys, module, skip):
    text = help_text(module, [], capsys)
    for field in dataclasses.fields(Config):
        if field.name in skip or field.name in NOT_FLAGS:
            continue
        described = option_help(text, field.name)
        words = described.split(None, 1)[1] if " " in described else ""
        # More than the field's own name (the fallback), and the default in brackets.
        assert len(words.split()) >= 4 and words.rstrip(" ]").lower() != field.name.replace("_", " "), described
        assert re.search(r"\[[^\]]*\]$", described), described


def test_help_shows_the_chosen_datasets_defaults(capsys):
    assert "[0.001]" in option_help(help_text(main, [], capsys), "lr")                       # AVDigits
    cremad = help_text(main, ["--dataset", "CREMAD"], capsys)
    assert "[0.0001]" in option_help(cremad, "lr") and "[224]" in option_help(cremad, "image_size")
    assert "[AVDigitsFeatures]" in option_help(help_text(main_trans, [], capsys), "dataset")
    embedded = help_text(main_trans, [], capsys)
    assert f"[{64}]" in option_help(embedded, "d_model") and "[15]" in option_help(embedded, "epochs")
    mer = help_text(main_trans, ["--dataset", "MERMULTI"], capsys)
    assert "[MERMULTI]" in option_help(mer, "dataset") and "[15]" not in option_help(mer, "epochs")


def test_help_follows_the_dataset_of_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("dataset: CREMAD\n")
    assert "[0.0001]" in option_help(help_text(main, ["--config", config], capsys), "lr")


def bad_value_error(module, argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: module.main([*map(str, argv), "--device", "cpu", "--no-progress"]))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("name", sorted(choices()))
def test_every_choice_flag_with_a_bad_value_is_one_sentence(tmp_path, capsys, name):
    module = main_trans if name in MID_FUSION_FIELDS else main
    error = bad_value_error(module, [flag(name), "no-such-value", "--out", tmp_path / "run"], capsys)
    assert flag(name) in error and "no-such-value" in error
    assert not (tmp_path / "run").exists()


def test_fusion_foo_lists_the_heads(tmp_path, capsys):
    error = bad_value_error(main, ["--fusion", "foo", "--out", tmp_path / "run"], capsys)
    for name in choices()["fusion"]:
        assert name in error


def test_help_shows_the_chosen_methods_recipe(capsys):
    from config import get_dataset_spec, recipe_defaults

    spec = get_dataset_spec("CREMAD")
    for method in sorted(choices()["method"]):
        recipe = recipe_defaults(spec, method)
        if recipe.get("lr") != spec.defaults.get("lr"):
            text = help_text(main, ["--dataset", "CREMAD", "--method", method], capsys)
            assert f"[{recipe['lr']}]" in option_help(text, "lr"), method


def test_help_lists_every_registered_choice(capsys):
    late, mid = help_text(main, [], capsys), help_text(main_trans, [], capsys)
    for name, allowed in choices().items():
        text = option_help(mid if name in MID_FUSION_FIELDS else late, name)
        assert all(value in text for value in allowed), (name, text)
