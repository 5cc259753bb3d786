"""Command-line entry points (``[project.scripts]``, ``python -m harpe_megatron.*``, ``tools/*.py``).

Importing this package hides megatron-core's import-time notices about absent optional kernels
(Transformer Engine, Apex): every entry point imports megatron, each rank would print a dozen such
lines before its first word, and they say nothing about what the command does. The other library
notices are hidden by :func:`harpe_megatron.cli.common.quiet_library_warnings`.
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
