# 4. Connecting to the agent's own ports on 127.0.0.1, or to an outside address.
import json, socket, sys

port = int(sys.argv[1])
out = {}
for name, addr in (("agent_port", ("127.0.0.1", port)), ("outside", ("1.1.1.1", 53)), ("outside6", ("2606:4700:4700::1111", 53))):
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(addr)
        out[name] = "connected"
    except OSError as e:
        out[name] = e.strerror or str(e)
    finally:
        s.close()
out["interfaces"] = sorted(n for _, n in socket.if_nameindex())
print(json.dumps(out))
