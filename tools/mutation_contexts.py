"""pytest plugin for tools/mutation.py: labels coverage data with the test that produced it.

In the pytest process the label is switched per test (a dynamic context); processes a test starts
inherit it as their static context through the serialized coverage configuration that
coverage's ``patch = subprocess`` passes down in ``COVERAGE_PROCESS_CONFIG``.
"""

import base64
import json
import os

import coverage
import pytest

_ENV = "COVERAGE_PROCESS_CONFIG"


def _label_children(nodeid: str) -> None:
    encoded = os.environ.get(_ENV)
    if encoded is None:
        return
    config = json.loads(base64.b64decode(encoded).decode())
    config["context"] = nodeid
    os.environ[_ENV] = base64.b64encode(json.dumps(config).encode()).decode()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.switch_context(item.nodeid)
    _label_children(item.nodeid)
    yield
    if cov is not None:
        cov.switch_context("")


_durations: dict = {}


def pytest_addoption(parser):
    parser.addoption("--mutation-durations", help="write each test's seconds to this JSON file")


def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.failed:
        _durations.setdefault("__failed__", []).append(report.nodeid)


def pytest_sessionfinish(session):
    path = session.config.getoption("--mutation-durations")
    if path:
        with open(path, "w") as f:
            json.dump(_durations, f, indent=1)
