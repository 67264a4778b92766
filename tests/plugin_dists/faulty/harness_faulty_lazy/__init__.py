"""A plugin that imports, but whose declarations clash or point at a module that fails."""
import harness


@harness.hookimpl
def harness_metrics():
    # described from the source without importing it; using it fails
    return {"faulty_lazy_metric": "harness_faulty_lazy.broken:Metric"}


@harness.hookimpl
def harness_mixers():
    return {"attention": "harness_faulty_lazy.broken:Metric"}  # a built-in plugin's name


@harness.hookimpl
def harness_commands():
    return {"run": harness.Lazy("harness_faulty_lazy.broken:RUN", "a command named like the core's")}
