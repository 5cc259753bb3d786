"""The memory/FLOP planner: a run's per-rank peak memory and FLOPs, without a GPU.

``plan`` builds one rank of a layout with the trainer's own builders (step/) and runs one micro-step
under ``FakeTensorMode``, counted by ``tracker``; it is also the trainer's start-up pre-flight
(``training.preflight``). ``plan_run`` plans a whole config, every stage, on a fake world of the
run's size and finds a change that fits (tools/plan_run.py). docs/performance.md section 3.
"""
