# 3. Seeing or signalling other processes: kill -1, kill of a host pid, ptrace.
import ctypes, json, os, signal, sys

host_pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
out = {}
try:
    os.kill(host_pid, signal.SIGKILL)
    out["kill_host_pid"] = "sent"
except OSError as e:
    out["kill_host_pid"] = e.strerror
PTRACE_ATTACH = 16
r = libc.ptrace(PTRACE_ATTACH, 1, None, None)
out["ptrace_init"] = "attached" if r == 0 else os.strerror(ctypes.get_errno())
r = libc.ptrace(0, 0, None, None)  # PTRACE_TRACEME
out["ptrace_traceme"] = "ok" if r == 0 else os.strerror(ctypes.get_errno())
# kill(-1) signals every process this one may signal except itself and init; in
# its own PID namespace there is nobody else.
try:
    os.kill(-1, signal.SIGKILL)
    out["kill_minus_1"] = "sent"
except OSError as e:
    out["kill_minus_1"] = e.strerror
print(json.dumps(out), flush=True)
