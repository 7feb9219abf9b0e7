# 13. SysV shared memory between two jobs: one creates a segment, the other looks for it.
import ctypes, json, sys, time

libc = ctypes.CDLL(None, use_errno=True)
KEY, IPC_CREAT = 0x5032_5053, 0o1000
if sys.argv[1] == "create":
    shmid = libc.shmget(KEY, 4096, IPC_CREAT | 0o666)
    print(json.dumps({"created": shmid}), flush=True)
    time.sleep(float(sys.argv[2]))
else:
    shmid = libc.shmget(KEY, 0, 0o666)
    print(json.dumps({"found": shmid, "error": ctypes.get_errno()}))
