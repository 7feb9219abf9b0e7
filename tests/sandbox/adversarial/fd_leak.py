# 11. An fd leak: every descriptor the job holds beyond 0-2.
import json, os

open_fds = []
for fd in range(0, 4096):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass
print(json.dumps({"fds": open_fds, "links": {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in open_fds}}))
