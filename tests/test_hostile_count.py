"""tools/hostile.py counts each hostile case by how it ended: as marked, silently wrong, or a raw traceback."""
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "hostile.py"

CASES = '''
import pytest

class Refused(Exception):
    pass

def refuse():
    raise Refused("clear")

@pytest.mark.hostile("clean error")
def test_refused():
    with pytest.raises(Refused, match="clear"):
        refuse()

@pytest.mark.hostile("clean error")
def test_finished_where_it_should_have_been_refused():
    with pytest.raises(Refused):
        pass

@pytest.mark.hostile("correct result")
@pytest.mark.parametrize("value", [1, 2])
def test_correct(value):
    assert value in (1, 2)

@pytest.mark.hostile("correct result")
def test_wrong_number():
    assert 1 + 1 == 3

@pytest.mark.hostile("clean error")
def test_escaped():
    {}["key"]

@pytest.mark.hostile("correct result")
def test_needs_assets():
    pytest.skip("assets absent")

def test_not_a_hostile_case():
    pass
'''


def test_each_case_is_counted_by_how_it_ended(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    done = subprocess.run([sys.executable, str(TOOL), "--tests", str(tmp_path)], capture_output=True, text=True,
                          cwd=tmp_path)
    summary = done.stdout[done.stdout.index("hostile inputs:"):].splitlines()
    assert summary[:6] == ["hostile inputs: 7 cases", "  clean errors        1", "  correct results     2",
                           "  silently wrong      2", "  raw tracebacks      1", "  skipped             1"]
    assert sorted(summary[6:]) == sorted([
        "  silently wrong: test_cases.py::test_finished_where_it_should_have_been_refused (Failed: DID NOT RAISE "
        "<class 'test_cases.Refused'>)",
        "  silently wrong: test_cases.py::test_wrong_number (assert (1 + 1) == 3)",
        "  raw traceback: test_cases.py::test_escaped (KeyError: 'key')",
        "  skipped: test_cases.py::test_needs_assets (Skipped: assets absent)"])
    assert done.returncode == 1
