"""Run the project's hostile-input cases and count their outcomes.

Every test marked ``hostile("clean error")`` or ``hostile("correct result")`` (tests/conftest.py) is one
case, each parametrisation one more. A case that passes ended as its mark says: refused with a clear
error, or a correct result. A case that fails ended otherwise: an expectation not met (a run that
finished where it should have been refused, a wrong number, an unclear message) counts as silently
wrong; an exception escaping from pilot counts as a raw traceback. Exit status 1 if either is non-zero.

    python tools/hostile.py [--tests tests] [-- extra pytest arguments]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTCOMES = ("clean error", "correct result")
FAILURES = ("silently wrong", "raw traceback")
HEADINGS = {"clean error": "clean errors", "correct result": "correct results", "silently wrong": "silently wrong",
            "raw traceback": "raw tracebacks", "skipped": "skipped"}


class OutcomeCounter:
    """A pytest plugin: the outcome of each hostile case, from its mark and how its test ended."""

    def __init__(self) -> None:
        self.outcomes: dict[str, str] = {}
        self.failures: list[str] = []
        self.skips: list[str] = []

    def pytest_configure(self, config) -> None:
        config.addinivalue_line("markers", "hostile(outcome): a hostile-input case and its expected outcome")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        mark = item.get_closest_marker("hostile")
        if mark is None or item.nodeid in self.outcomes and self.outcomes[item.nodeid] in FAILURES:
            return
        expected = mark.args[0]
        if expected not in OUTCOMES:
            raise pytest.UsageError(f"{item.nodeid}: hostile outcome must be one of {OUTCOMES}, got {expected!r}")
        if report.skipped:
            self.outcomes[item.nodeid] = "skipped"
            self.skips.append(f"skipped: {item.nodeid} ({report.longrepr[-1]})")
        elif report.failed:
            self.outcomes[item.nodeid] = _failure_kind(call.excinfo)
            crash = getattr(report.longrepr, "reprcrash", None)
            why = f" ({crash.message.splitlines()[0][:200]})" if crash and crash.message else ""
            self.failures.append(f"{self.outcomes[item.nodeid]}: {item.nodeid}{why}")
        elif report.when == "call":
            self.outcomes[item.nodeid] = expected


def _failure_kind(excinfo) -> str:
    """An expectation not met (an assertion, or pytest.raises that saw nothing) is silently wrong; any other
    exception escaped from the code under test."""
    if excinfo is not None and (excinfo.errisinstance(AssertionError) or excinfo.errisinstance(pytest.fail.Exception)):
        return "silently wrong"
    return "raw traceback"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", default=str(REPO / "tests"), help="folder of tests (default: the project's)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args(argv)
    counter = OutcomeCounter()
    pytest.main([args.tests, "-m", "hostile", "-q", "-p", "no:cacheprovider", *args.pytest_args], plugins=[counter])
    counts = Counter(counter.outcomes.values())
    print(f"\nhostile inputs: {len(counter.outcomes)} cases")
    for outcome, heading in HEADINGS.items():
        print(f"  {heading:<16} {counts[outcome]:>4}")
    for line in counter.failures + counter.skips:
        print(f"  {line}")
    return int(any(counts[failure] for failure in FAILURES))


if __name__ == "__main__":
    sys.exit(main())
