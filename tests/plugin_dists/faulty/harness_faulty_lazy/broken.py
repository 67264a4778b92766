import no_such_dependency_either  # noqa: F401


class Metric:
    """A metric whose module cannot be imported."""
