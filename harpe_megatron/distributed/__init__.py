"""Process groups and megatron's parallel state: one bring-up and the CPU backend.

``bringup.megatron_parallel`` is the only place megatron's parallel state is initialised
(training, conversion, tests, benchmarks); ``cpu`` is the CUDA->CPU redirection it enters when
the device is ``cpu``; ``signals`` keeps helper processes alive through a preemption signal.
"""
