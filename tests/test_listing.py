"""``logitpair list``: every registered component, one line each, from the registries themselves."""

from __future__ import annotations

import inspect
import json

import pytest
from torch import nn

from logitpair.attacks import ATTACKS
from logitpair.cli.listing import KINDS, catalogue, describe_suite
from logitpair.cli.main import main
from logitpair.data import DATASETS
from logitpair.evaluation import AttackSpec
from logitpair.evaluation.gates import Gate
from logitpair.evaluation.suites import SUITES
from logitpair.experiments.presets import PRESETS
from logitpair.methods import METHODS
from logitpair.models import MODELS
from logitpair.registry import Registry, summary

REGISTERED = {
    "models": MODELS.names(),
    "datasets": DATASETS.names(),
    "methods": METHODS.names(),
    "attacks": ATTACKS.names(),
    "suites": sorted(SUITES),
    "presets": PRESETS.names(),
}


def test_every_registered_item_has_a_one_line_description():
    cat = catalogue()
    assert tuple(cat) == KINDS
    for kind, names in REGISTERED.items():
        assert [item["name"] for item in cat[kind]] == names, kind
        for item in cat[kind]:
            text = item["description"]
            assert text.strip() and "\n" not in text and text == text.strip(), (kind, item)
            assert "``" not in text and ":func:" not in text, f"{kind} {item['name']}: reST markup left: {text}"


@pytest.mark.parametrize(
    ("registry", "get"),
    [
        (MODELS, MODELS.get),
        (DATASETS, DATASETS.get),
        (ATTACKS, ATTACKS.get),
        (METHODS, lambda n: METHODS.entry(n).loss),
    ],
    ids=["models", "datasets", "attacks", "methods"],
)
def test_docstring_descriptions_are_whole_summary_lines(registry, get):
    """Where the description is a docstring's first line, that line is PEP 257's summary line
    (a blank line follows it), so `list` never shows half a wrapped sentence."""
    for name in registry.names():
        doc = inspect.getdoc(get(name)) or ""
        if registry.describe(name) != summary(get(name)):
            continue  # an explicit description= at registration
        lines = doc.split("\n")
        assert len(lines) == 1 or not lines[1].strip(), f"{name}: docstring's first line continues: {lines[:2]}"


def test_list_json_parses_and_text_has_every_name(capsys):
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == catalogue()
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for kind, names in REGISTERED.items():
        assert f"{kind}:" in text
        for name in names:
            assert any(line.split()[:1] == [name] for line in text.splitlines()), (kind, name)


def test_a_new_component_is_described_by_its_docstring_or_its_registration():
    reg: Registry = Registry("model")

    @reg.register("tiny")
    def tiny(num_classes: int = 10) -> nn.Module:
        """A one-layer net for tests.

        More text that `list` does not show."""
        return nn.Linear(4, num_classes)

    reg.register("other", description="Explicit words.")(tiny)
    assert reg.describe("tiny") == "A one-layer net for tests."
    assert reg.describe("other") == "Explicit words."
    reg.unregister("other")
    assert "other" not in reg
    assert summary(object()) == "" and summary(nn.Linear(1, 1)) == "", "an instance has no description of its own"


def test_suite_line_names_gates_the_way_the_attacks_syntax_does():
    specs = [
        AttackSpec("apgd-ce", {"steps": 10}, "APGD-CE (10 steps)"),
        AttackSpec(
            "apgd-ce", {"steps": 50}, "APGD-CE (50 steps; remaining margin < 0.1)", gate=Gate("near", max_margin=0.1)
        ),
    ]
    assert describe_suite(specs) == "APGD-CE (10 steps), APGD-CE (50 steps) [gate=near]"
    assert describe_suite([]) == "no attacks (clean accuracy only)"
