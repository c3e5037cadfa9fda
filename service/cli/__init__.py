"""The ``conveyor`` command line (typer + rich), a thin layer over ``Client``."""
