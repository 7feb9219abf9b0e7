# The warm pool's stand-in: the first program of a pre-started sandbox.
#
# Runs inside the sandbox (already in its namespaces, cgroup and seccomp filter),
# waits on its control pipe for the job it becomes, sets the job's rlimits, closes
# every descriptor but 0-2 and executes the job's program with exactly the job's
# environment: the job's program then is the sandbox's first process, as in a
# sandbox built for it. EOF without a job (the pool is shutting down) exits
# quietly. The agent passes this file's text to `python3 -I -S -c`; it must stay
# self-contained and quick to start.
import json
import os
import resource
import signal
import sys

ctl = int(sys.argv[-1])
chunks = []
while True:
    b = os.read(ctl, 1 << 16)
    if not b:
        break
    chunks.append(b)
os.close(ctl)
if not chunks:
    os._exit(0)
spec = json.loads(b"".join(chunks))
argv = spec["argv"]
# default dispositions for the SIGPIPE and SIGXFSZ that Python ignores (what
# subprocess's restore_signals does): a job past its output or file-size limit
# must die of them as it would anywhere else
for sig in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(sig, signal.SIG_DFL)
os.closerange(3, 1 << 16)
for name, (soft, hard) in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, "RLIMIT_" + name.upper()), (soft, hard))
try:
    os.execve(argv[0], argv, spec["env"])
except OSError as e:
    os.write(2, f"p2psched: cannot execute {argv[0]}: {e.strerror}\n".encode())
    os._exit(127)
