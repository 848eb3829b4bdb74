"""The mutation check's snippets still match the code (the full check runs as a script)."""

import shutil
from pathlib import Path

import pytest
from mutation_check import MUTATIONS, ROOT, apply_mutation


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutation_applies_to_the_current_code(mutation, tmp_path):
    target = tmp_path / mutation.path
    target.parent.mkdir(parents=True)
    shutil.copy2(ROOT / mutation.path, target)
    apply_mutation(tmp_path, mutation)
    assert target.read_text() != (ROOT / mutation.path).read_text()
    for test in mutation.tests:
        assert (ROOT / test).exists(), f"{mutation.name} names a missing test file {test}"


def test_every_mutation_named_in_the_issue_is_listed():
    names = {m.name for m in MUTATIONS}
    assert len(names) == len(MUTATIONS)
    assert Path(ROOT / "tests" / "mutation_check.py").exists()
