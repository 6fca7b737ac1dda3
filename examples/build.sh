#!/bin/sh
# Builds every example program and patch library into OUTDIR
# (default: target/examples). Needs a C compiler.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/../target/examples"}
inc="$here/../include"
cc=${CC:-cc}
cflags=${CFLAGS:-"-O2 -g -Wall -Wextra"}
mkdir -p "$out"
# Patchable entries (two bytes of nop at each function) make every function replaceable, even
# one that calls or branches in its first bytes.
patchable="-fpatchable-function-entry=16,14"
for p in greeter plugin-host shadow-host state-host; do
	# -rdynamic: patches call functions and use variables of the program.
	"$cc" $cflags $patchable -rdynamic -o "$out/$p" "$here/programs/$p.c" -ldl
done
"$cc" $cflags $patchable -shared -fPIC -o "$out/libcallbacks-mod.so" "$here/programs/callbacks-mod.c"
for p in livepatch-sample livepatch-cumulative livepatch-callbacks-demo \
	livepatch-shadow-fix1 livepatch-shadow-fix2; do
	"$cc" $cflags -shared -fPIC -I"$inc" -o "$out/$p.so" "$here/patches/$p.c"
done
for v in 1 2; do
	"$cc" $cflags -shared -fPIC -I"$inc" -DSTATE_VERSION=$v \
		-o "$out/livepatch-state-v$v.so" "$here/patches/livepatch-state.c"
done
echo "examples built in $out"
