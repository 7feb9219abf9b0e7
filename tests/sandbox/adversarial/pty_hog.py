# 15. Pseudo-terminals: each one a job opens comes out of the host's kernel.pty.max.
import json, os

out = {}
for name, attempt in (("openpty", os.openpty), ("ptmx", lambda: os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY))):
    try:
        attempt()
        out[name] = "opened"
    except OSError as e:
        out[name] = e.strerror
try:
    os.mkdir("/dev/pts/x")
    out["write_pts"] = "wrote"
except OSError as e:
    out["write_pts"] = e.strerror
out["null"] = os.path.exists("/dev/null")
print(json.dumps(out))
