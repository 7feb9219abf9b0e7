# 9. A double-fork + setsid daemon that tries to outlive its job.
import os, sys, time

marker = sys.argv[1]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", marker])
    os._exit(0)
os.wait()
print("daemon started", flush=True)
if len(sys.argv) > 2:
    time.sleep(float(sys.argv[2]))
