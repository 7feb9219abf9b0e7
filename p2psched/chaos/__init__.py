"""A Jepsen-style harness: clients, a seeded nemesis, a history, and a checker.

It proves the job guarantees under faults: an accepted job executes at least once,
its final result is recorded exactly once, and a cancellation reaches the job
wherever it is. ``docs/chaos.md`` explains how to run it and read its verdict.

Public interface:

* ``run_chaos(RunConfig(agents=4, duration=40, seed=1, jobs=300, ...)) -> (Verdict, run_dir)``
  (:mod:`p2psched.chaos.harness`): a whole run, blocking, with teardown on any exit.
* ``check(ops, final, max_attempts=5) -> Verdict`` (:mod:`p2psched.chaos.checker`):
  the pure checker; ``Verdict.ok``, ``.violations``, ``.counts``, ``.figures``,
  ``.render()``.
* ``plan_faults(seed, nodes, duration, kinds) -> [Fault]`` and ``FaultBackend``
  (:mod:`p2psched.chaos.nemesis`): the seeded fault plan and what a fault backend
  implements (``LocalFaults`` for processes in network namespaces, ``DockerFaults``
  for the compose cluster).
* ``python -m p2psched.chaos run --agents N --duration S --seed K --jobs M`` and
  ``python -m p2psched.chaos check RUN_DIR`` (``scripts/chaos.sh`` wraps the first).
"""

from p2psched.chaos.checker import Verdict, Violation, check
from p2psched.chaos.harness import RunConfig, run_chaos
from p2psched.chaos.nemesis import Fault, FaultBackend, plan_faults

__all__ = ["Fault", "FaultBackend", "RunConfig", "Verdict", "Violation", "check", "plan_faults", "run_chaos"]
