"""Every method's own settings are reachable and only its own: ``main.py --method M --help``
lists M's flags (with the values that apply) and no other method's; a flag or a YAML key
reaches the method ``method_from_config`` builds; another method's setting and a misspelt
flag are one sentence each. Read from the registry (``olmbalance.METHODS[...].settings``), so
a method that adds or renames a setting is covered without editing this file."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest
import torch
import yaml

import main
import olmbalance
from config import MID_FUSION_FIELDS, entry_parser, get_dataset_spec, recipe_defaults, resolve_config
from engines.methods import method_from_config
from olmbalance.errors import UserError

HEADS = ("audio", "visual", "fusion")
DATASET = "AVDigits"
WITH_SETTINGS = sorted(name for name, entry in olmbalance.METHODS.items() if entry.settings)
SETTINGS = [(name, setting.name) for name in WITH_SETTINGS for setting in olmbalance.METHODS[name].settings]


def test_the_methods_of_the_issue_have_settings():
    assert {"ogm_ge", "g_blending", "pmr", "agm", "mmpareto", "mla"} <= set(WITH_SETTINGS)


def setting_of(name: str, setting_name: str):
    entry = olmbalance.METHODS[name]
    return entry, next(s for s in entry.settings if s.name == setting_name)


def builds(name: str, values: dict) -> bool:
    """Does ``method_from_config`` accept these settings (with the run context a real run gives)?"""
    cfg = parse(["--dataset", DATASET, "--method", name])
    entry = olmbalance.METHODS[name]
    cfg.method_settings = {f"{entry.prefix}_{key}": value for key, value in values.items()}
    try:
        method_from_config(cfg, HEADS, 64)
    except UserError:
        return False
    return True


def other_value(name: str, setting):
    """A value of ``setting`` other than its default that the method accepts."""
    default = setting.default
    if setting.choices:
        candidates = [c for c in setting.choices if c != default]
    elif setting.type is bool:
        candidates = [not default]
    elif setting.type is int:
        candidates = [default + 1, default + 2, max(default - 1, 0)]
    elif setting.type is float:
        candidates = [default * 0.5, default * 2, default + 0.5, 0.5, 0.25]
    else:  # free text (paths, lists): the method's own test module names a value it accepts
        from tests.method_steps import equivalence_module

        candidates = getattr(equivalence_module(name), "OTHER_SETTING_VALUES", {}).get(setting.name, [])
    for value in candidates:
        if value != default and builds(name, {setting.name: value}):
            return value
    raise AssertionError(f"no accepted non-default value for {name}'s {setting.name} among {candidates}")


def argv_for(entry, setting, value) -> list[str]:
    flag = entry.flag(setting)
    if setting.type is bool:
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def parse(argv: list[str]):
    argv = [str(a) for a in argv]
    return resolve_config(entry_parser("test", argv, skip=MID_FUSION_FIELDS).parse_args(argv))


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main.main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, flag: str) -> str | None:
    """The help paragraph of ``flag`` in argparse's --help output (None when it is not listed)."""
    match = re.search(rf"^  {re.escape(flag)}(?=[\s,]).*?(?=^  -|\Z)", text, re.S | re.M)
    return " ".join(match.group(0).split()) if match else None


class Spy:
    """Replaces a method's factory in the registry and records the settings it is given."""

    def __init__(self, monkeypatch, name: str):
        entry = olmbalance.METHODS[name]
        self.calls: list[dict] = []

        def factory(heads, context, **values):
            self.calls.append(values)
            return entry.factory(heads, context, **values)

        monkeypatch.setitem(olmbalance.METHODS, name, dataclasses.replace(entry, factory=factory))


def fingerprint(method) -> dict:
    """What a built method holds: its plain attributes and its state."""
    plain = {k: repr(v) for k, v in vars(method).items()
             if isinstance(v, (bool, int, float, str, tuple, dict)) and k != "training"}
    state = {k: repr(v.tolist()) if torch.is_tensor(v) else repr(v) for k, v in method.state_dict().items()}
    return {**plain, **state}


@pytest.mark.parametrize("name", WITH_SETTINGS)
def test_help_lists_the_methods_own_settings_with_the_values_that_apply(name, capsys):
    entry = olmbalance.METHODS[name]
    text = help_text(["--dataset", DATASET, "--method", name], capsys)
    applying = recipe_defaults(get_dataset_spec(DATASET), name)
    for setting in entry.settings:
        flag = entry.flag(setting)
        paragraph = option_help(text, flag)
        assert paragraph, f"{flag} missing from --method {name} --help"
        assert f"[{applying.get(entry.key(setting), setting.default)}]" in paragraph, paragraph
    for other in olmbalance.METHODS.values():
        if other.prefix != entry.prefix:
            for setting in other.settings:
                assert option_help(text, other.flag(setting)) is None, f"--method {name} --help lists {other.flag(setting)}"


@pytest.mark.parametrize("name, setting_name", SETTINGS)
def test_a_flag_reaches_the_built_method(name, setting_name, monkeypatch):
    entry, setting = setting_of(name, setting_name)
    value = other_value(name, setting)
    default_method = method_from_config(parse(["--dataset", DATASET, "--method", name]), HEADS, 64)
    spy = Spy(monkeypatch, name)
    cfg = parse(["--dataset", DATASET, "--method", name, *argv_for(entry, setting, value)])
    assert cfg.method_settings[entry.key(setting)] == value
    method = method_from_config(cfg, HEADS, 64)
    assert spy.calls[-1][setting.name] == value
    assert fingerprint(method) != fingerprint(default_method), f"{entry.flag(setting)} {value} changed nothing"


@pytest.mark.parametrize("name, setting_name", SETTINGS)
def test_a_yaml_key_reaches_the_built_method(name, setting_name, monkeypatch, tmp_path):
    entry, setting = setting_of(name, setting_name)
    value = other_value(name, setting)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": name, entry.key(setting): value}))
    spy = Spy(monkeypatch, name)
    cfg = parse(["--dataset", DATASET, "--config", path])
    method_from_config(cfg, HEADS, 64)
    assert spy.calls[-1][setting.name] == value
    # A flag still overrides the file.
    flagged = parse(["--dataset", DATASET, "--config", path, *argv_for(entry, setting, setting.default)])
    assert flagged.method_settings[entry.key(setting)] == setting.default


@pytest.mark.parametrize("name", WITH_SETTINGS)
def test_another_methods_setting_is_one_sentence(name, tmp_path):
    entry = olmbalance.METHODS[name]
    other = next(e for e in olmbalance.METHODS.values() if e.settings and e.prefix != entry.prefix)
    setting = other.settings[0]
    argv = argv_for(other, setting, setting.default)
    with pytest.raises(UserError) as flagged:
        parse(["--dataset", DATASET, "--method", name, *argv])
    message = str(flagged.value)
    assert "\n" not in message and message.count(". ") == 0
    assert other.flag(setting) in message and f"--method {other.name}" in message and f"--method {name}" in message
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": name, other.key(setting): setting.default}))
    with pytest.raises(UserError, match=re.escape(other.flag(setting))):
        parse(["--dataset", DATASET, "--config", path])


@pytest.mark.parametrize("name", WITH_SETTINGS)
def test_a_misspelt_flag_is_one_sentence_with_a_suggestion(name):
    entry = olmbalance.METHODS[name]
    flag = entry.flag(entry.settings[0])
    misspelt = flag[:-2] + flag[-1] + flag[-2]  # the last two letters swapped
    with pytest.raises(UserError) as stop:
        parse(["--dataset", DATASET, "--method", name, misspelt, "1"])
    message = str(stop.value)
    assert "\n" not in message and f"did you mean {flag}?" in message, message


def test_a_setting_without_a_method_of_its_own_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": "joint", "nomethod_alpha": 1.0}))
    with pytest.raises(UserError, match="unknown keys: nomethod_alpha"):
        parse(["--dataset", DATASET, "--config", path])
    with pytest.raises(UserError, match=r"has no setting 'nothing'"):
        olmbalance.build_method("agm", HEADS, {"nothing": 1})
    assert isinstance(argparse.Namespace(), argparse.Namespace)


def test_the_published_methods_table_is_the_registry():
    # docs/results/methods.md (in README's Methods section) must say what the code declares.
    from pathlib import Path

    from engines.methods import methods_table

    published = (Path(__file__).resolve().parents[1] / "docs" / "results" / "methods.md").read_text()
    assert methods_table() in published, "rerun: python -m engines.methods --report docs/results/methods.md"
