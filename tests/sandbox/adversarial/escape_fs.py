# 1. Writing outside scratch: absolute paths, ../, a symlink planted in scratch.
import json, os, sys

target = sys.argv[1]  # a host file the test watches
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "wrote"
    except OSError as e:
        out[name] = e.strerror

def write(p):
    with open(p, "w") as f:
        f.write("pwned")

attempt("absolute_target", lambda: write(target))
attempt("absolute_etc", lambda: write("/etc/pwned"))
attempt("absolute_usr", lambda: write("/usr/pwned"))
attempt("root", lambda: write("/pwned"))
attempt("dotdot", lambda: write("../pwned"))
attempt("dotdot_deep", lambda: write("../../../../../../" + target.lstrip("/")))
attempt("dev_shm", lambda: write("/dev/shm/pwned"))
os.symlink(target, "link")
attempt("symlink", lambda: write("link"))
os.symlink("/etc/passwd", "passwd_link")
attempt("symlink_etc", lambda: write("passwd_link"))
attempt("scratch", lambda: write("ok.txt"))
print(json.dumps(out))
