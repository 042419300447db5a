"""The ``matfit`` command line: ``main`` dispatches to one module per group of commands."""
