#!/usr/bin/env bash
# Set up .venv, start a local 3-agent cluster on loopback, run the example jobs
# against it, print a summary, and stop the cluster. No arguments needed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

NODES=${NODES:-3}
BASE=${BASE_PORT:-17700}
run_dir=$(mktemp -d -t p2psched-demo.XXXXXX)
export P2PSCHED_URL="http://127.0.0.1:${BASE}"

echo "== starting ${NODES} agents (logs in ${run_dir}/logs)"
p2psched up --nodes "$NODES" --base-port "$BASE" --data-root "$run_dir/data" --log-dir "$run_dir/logs" \
  --topology topologies/small.yaml --cpus 1 --secure \
  >"$run_dir/up.out" 2>"$run_dir/up.err" &
up_pid=$!
cleanup() {
  kill -INT "$up_pid" 2>/dev/null || true
  wait "$up_pid" 2>/dev/null || true
  rm -rf "$run_dir"
}
trap cleanup EXIT
for _ in $(seq 1 150); do
  grep -q "agents up" "$run_dir/up.err" 2>/dev/null && break
  kill -0 "$up_pid" 2>/dev/null || { cat "$run_dir/up.err" >&2; exit 1; }
  sleep 0.2
done
cat "$run_dir/up.out"

echo
echo "== hello (WASI stdout)"
p2psched submit examples/wasm/hello.wasm --wait

echo "== vector add: [1,2,3,4] + [10,20,30,40]"
python3 -c 'import struct,sys; sys.stdout.buffer.write(struct.pack("<4f",1,2,3,4)+struct.pack("<4f",10,20,30,40))' \
  >"$run_dir/vec.bin"
p2psched submit examples/wasm/vecadd.wasm --input "$run_dir/vec.bin" --wait \
  | python3 -c 'import struct,sys; d=sys.stdin.buffer.read(); print(list(struct.unpack(f"<{len(d)//4}f", d)))'

echo "== sha256 of 'p2psched' (guest vs host)"
printf 'p2psched' | p2psched submit examples/wasm/sha256.wasm --input - --wait
printf 'p2psched' | sha256sum | cut -d' ' -f1

echo "== tiny MLP inference"
p2psched submit examples/wasm/mlp.wasm --input examples/wasm/mlp.in.bin --wait \
  | python3 -c 'import struct,sys; d=sys.stdin.buffer.read(); print("logits:", [round(x,4) for x in struct.unpack(f"<{len(d)//4}f", d)])'

echo "== a spec file: six example guests in one batch (examples/jobs/guests.yaml)"
p2psched batch examples/jobs/guests.yaml --wait

echo "== placement: agent 0 is busy, so the next job runs on its same-leaf neighbour"
busy=$(p2psched submit examples/wasm/loop.wasm --wall-ms 120000)
until [[ $(p2psched status "$busy" --json) == *'"state": "running"'* ]]; do sleep 0.1; done
sleep 1  # one gossip round carries agent 0's full vector
fwd=$(p2psched submit examples/wasm/hello.wasm)
p2psched status "$fwd" --wait 30
p2psched cancel "$busy" >/dev/null || true

echo "== adversarial guests, each stopped by its limit"
for guest in loop membomb recurse; do
  id=$(p2psched submit "examples/wasm/${guest}.wasm" --wall-ms 1000)
  # The first line only, without a pipe: under pipefail, head closing the pipe
  # early could fail the script with p2psched's broken-pipe exit.
  record=$(p2psched status "$id" --wait 30)
  echo "${record%%$'\n'*}"
done

echo "== a batch of 200 noop jobs through the batch API"
python3 - <<PY
import base64, collections, httpx, time
mod = base64.b64encode(open("examples/wasm/noop.wasm", "rb").read()).decode()
t = time.perf_counter()
with httpx.Client(base_url="${P2PSCHED_URL}", timeout=60) as http:
    r = http.post("/v1/jobs:batch", json={"jobs": [{"module": mod} for _ in range(200)]})
    ids = [x["job"]["id"] for x in r.json()["results"]]
    done = http.post("/v1/jobs:wait", json={"ids": ids, "wait": 50}).json()["results"]
    states = [item["job"]["state"] for item in done]
ran = collections.Counter(item["job"]["executor"] for item in done)
print(f"{states.count('succeeded')}/{len(ids)} succeeded in {time.perf_counter() - t:.2f}s; ran on "
      + ", ".join(f"{node} {n}" for node, n in sorted(ran.items())))
PY

echo
echo "== cluster as agent 0 sees it"
p2psched peers
echo
echo "== summary: jobs by state, and the first 20 (the examples)"
p2psched jobs --counts | tr -s ' ' | paste -sd ',' | sed 's/,/, /g'
p2psched jobs --limit 20

echo
echo "== dashboard"
if python -c 'import sys, httpx; sys.exit("<title>p2psched</title>" not in httpx.get(sys.argv[1]).text)' \
    "${P2PSCHED_URL}/ui/"; then
  echo "every agent serves one at /ui/; this cluster's: ${P2PSCHED_URL}/ui/"
else
  echo "the dashboard at ${P2PSCHED_URL}/ui/ did not answer" >&2
  exit 1
fi
if [ "${HOLD:-0}" = 1 ]; then
  echo "HOLD=1: the cluster stays up for the dashboard; Ctrl-C stops it"
  wait "$up_pid" || true
else
  echo "(the cluster stops now; run HOLD=1 ./scripts/demo.sh to keep it up and look)"
fi
