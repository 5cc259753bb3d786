"""The commands: one module per ``[project.scripts]`` entry, each a ``main(argv) -> exit code``.

``tools/*.py`` and ``python -m harpe_megatron.train`` run the same mains; ``common`` holds what the
commands share (argument parsing of a run config, quieter library warnings).

Importing this package hides megatron-core's import-time notices about absent optional kernels
(Transformer Engine, Apex): every command imports megatron, each rank would print a dozen such
lines before its first word, and they say nothing about what the command does. The other library
notices are hidden by :func:`harpe_megatron.cli.common.quiet_library_warnings`. Likewise torch's
``torch.utils.cpp_extension`` log line "No CUDA runtime is found, using CUDA_HOME=..." (the CUDA
build of torch on a machine without a GPU, imported through megatron): no command builds an
extension; its errors still show.
"""

import logging
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
