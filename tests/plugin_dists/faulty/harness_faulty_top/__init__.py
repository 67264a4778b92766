"""A plugin providing only a metric, whose import fails (a dependency that is not installed)."""
import no_such_dependency_here  # noqa: F401

import harness


@harness.hookimpl
def harness_metrics():
    return {"faulty_metric": lambda: None}
