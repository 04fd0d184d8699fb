"""edgeops: the `edgeops` command line, dispatching to the project's packages."""

__version__ = "0.1.0"
