"""The commands: one module per ``[project.scripts]`` entry, each a ``main(argv) -> exit code``.

``tools/*.py`` and ``python -m harpe_megatron.train`` run the same mains; ``common`` holds what the
commands share (argument parsing of a run config, quieter library warnings).
"""
