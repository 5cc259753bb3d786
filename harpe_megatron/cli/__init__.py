"""The commands: one module per ``[project.scripts]`` entry, each a ``main(argv) -> exit code``.

``tools/*.py`` and ``python -m harpe_megatron.train`` run the same mains; ``common`` holds what the
commands share (argument parsing of a run config, quieter library warnings).

Importing this package hides megatron-core's import-time notices about absent optional kernels
(Transformer Engine, Apex): every command imports megatron, each rank would print a dozen such
lines before its first word, and they say nothing about what the command does. The other library
notices are hidden by :func:`harpe_megatron.cli.common.quiet_library_warnings`.
"""

import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
