#!/usr/bin/env bash
# Builds livepatch and the examples, then patches a running program live:
# start greeter, load livepatch-sample, replace it with livepatch-cumulative
# (atomic replace), disable it, and show the original behaviour again.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --release -p livepatch-cli -p livepatch-agent
sh examples/build.sh target/examples >/dev/null
lp=target/release/livepatch
ex=$PWD/target/examples

work=$(mktemp -d)
export LIVEPATCH_SOCKET_DIR="$work/sockets"
mkfifo "$work/stdin"
exec 3<>"$work/stdin"
out="$work/greeter.out"
trap 'echo quit >&3 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT

# Waits until the program prints a line containing $1, then shows that line.
await_line() {
	for _ in $(seq 1 200); do
		if line=$(grep -m1 -F -- "$1" <(tail -n +"$2" "$out")); then
			echo "    program says: ${line}"
			return 0
		fi
		sleep 0.05
	done
	echo "demo: the program never printed '$1'" >&2
	exit 1
}

step() { printf '\n== %s\n' "$*"; }

step "start greeter under the agent (livepatch run)"
LIVEPATCH_LOG=stderr "$lp" run -- "$ex/greeter" 100 <&3 >"$out" 2>&1 &
pid=$!
await_line "original greeting" 1
for _ in $(seq 1 100); do [ -S "$LIVEPATCH_SOCKET_DIR/$pid.sock" ] && break; sleep 0.05; done
"$lp" list

mark() { wc -l <"$out" | awk '{print $1 + 1}'; }

step "livepatch load $pid livepatch-sample.so"
from=$(mark)
"$lp" load "$pid" "$ex/livepatch-sample.so"
await_line "this has been live patched" "$from"

step "livepatch load $pid livepatch-cumulative.so (replaces the sample atomically)"
from=$(mark)
"$lp" load "$pid" "$ex/livepatch-cumulative.so"
await_line "live patched, cumulatively" "$from"
"$lp" status "$pid"

step "livepatch disable $pid livepatch_cumulative"
from=$(mark)
"$lp" disable "$pid" livepatch_cumulative
await_line "original greeting" "$from"
"$lp" unload "$pid" livepatch_cumulative
"$lp" unload "$pid" livepatch_sample

step "the agent's log (livepatch log $pid)"
"$lp" log "$pid"

echo quit >&3
wait "$pid"
step "done: patched live, replaced, unpatched; the program never restarted (pid $pid)"
