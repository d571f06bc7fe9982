"""When a test on the multi-process swarm fails, its report carries what those processes logged."""

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    swarm = getattr(item, "funcargs", {}).get("swarm")
    if report.failed and swarm is not None:
        for proc in swarm.procs:
            report.sections.append((f"stderr of {proc.name}", proc.stderr_tail() or "(nothing)"))
