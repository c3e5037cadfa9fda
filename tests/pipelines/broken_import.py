"""A pipeline file that cannot be imported."""

import conveyor_no_such_dependency  # noqa: F401
