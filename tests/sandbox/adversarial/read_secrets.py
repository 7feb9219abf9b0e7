# 2. Reading host secrets: /etc/shadow, and every /proc/<pid>/environ in sight.
import json, os, sys

agent_pid = sys.argv[1]
out = {"environ": ""}
for p in ("/etc/shadow", "/etc/gshadow", "/etc/ssh", f"/proc/{agent_pid}/environ"):
    try:
        with open(p, "rb") as f:
            out[p] = f.read(100).decode(errors="replace")
    except OSError as e:
        out[p] = e.strerror
for pid in os.listdir("/proc"):
    if pid.isdigit():
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as f:
                    out["environ"] += f.read().decode(errors="replace")
            except OSError:
                pass
out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(out))
