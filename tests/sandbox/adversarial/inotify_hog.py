# 16. Per-user kernel limits: inotify instances are counted per host uid. "hog" takes
# as many as it can and holds them; "one" then asks for a single instance.
import ctypes, json, os, sys, time

libc = ctypes.CDLL(None, use_errno=True)
held = []
want = 1 if sys.argv[1] == "one" else int(sys.argv[2])
while len(held) < want:
    fd = libc.inotify_init1(0)
    if fd < 0:
        break
    held.append(fd)
err = os.strerror(ctypes.get_errno()) if len(held) < want else None
print(json.dumps({"held": len(held), "error": err, "uid": os.getuid()}), flush=True)
if sys.argv[1] == "hog":
    time.sleep(float(sys.argv[3]))
