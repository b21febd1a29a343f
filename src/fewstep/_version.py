"""The package version, in a module of its own: modules below the package's front door read it
without importing ``fewstep`` itself, which imports them (an import cycle). The one place it is
set: pyproject.toml reads it ([tool.setuptools.dynamic]); CHANGELOG.md names it."""

__version__ = "0.2.0"
