"""The solver framework: the step record, its registries (weight variants, noise rules), presets."""

from . import noise_rules, variants  # noqa: F401  (register the built-in variants and noise rules)
