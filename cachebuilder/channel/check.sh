#!/bin/sh
# Smoke test of the offline channel against the real Nix store (run as root, offline):
# builds every package and a few environments, runs their programs, and checks the failures
# (unknown names, the broken package) fail the way the builder expects.   Usage: sh check.sh
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export NIX_CONFIG="${NIX_CONFIG:-substituters =}"   # see README.md: no binary cache offline
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }
build() { nix-build --no-out-link "$@" 2>"$tmp/log" </dev/null || { cat "$tmp/log" >&2; return 1; }; }
env_of() { build "$here/env.nix" --argstr channel "${2:-$here}" --argstr namesJson "$1"; }
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

[ -f "$here/versions.json" ] || sh "$here/setup.sh" >/dev/null

for p in busybox bash coreutils gcc python3 nodejs; do
  out=$(build "$here" -A "$p") || fail "building $p"
  [ "$(cat "$out/nix-support/version")" = "$(nix-instantiate --eval "$here" -A "$p.version" | tr -d '"')" ] \
    || fail "$p: version mismatch"
  echo "ok   package $p -> $out"
done

e=$(env_of '["busybox"]'); bin=$(json "$e/env.json" 'd["PATH"]')
[ "$(env -i PATH="$bin" sh -c 'echo hi | tr a-z A-Z')" = HI ] || fail "busybox env"
echo "ok   env [busybox] -> $e"

e=$(env_of '["gcc"]'); bin=$(json "$e/env.json" 'd["PATH"]')
printf '#include <stdio.h>\nint main(void){puts("compiled");return 0;}\n' > "$tmp/h.c"
env -i PATH="$bin" gcc -o "$tmp/h" "$tmp/h.c" && [ "$("$tmp/h")" = compiled ] || fail "gcc env"
echo "ok   env [gcc] -> $e"

e=$(env_of '["python3","nodejs"]'); bin=$(json "$e/env.json" 'd["PATH"]')
env -i PATH="$bin" python3 -c 'print(6*7)' | grep -qx 42 || fail "python3 env"
env -i PATH="$bin" node -e 'console.log(6*7)' | grep -qx 42 || fail "nodejs env"
json "$e/packages.json" '" ".join(sorted(p["attr"] for p in d))' | grep -qx 'nodejs python3' || fail packages.json
[ "$(json "$e/closure.json" '"\n".join(sorted(d))')" = "$(nix-store -qR "$e" | sort)" ] || fail closure.json
echo "ok   env [python3, nodejs] -> $e"

# Same set in another order, with a duplicate: same derivation.
[ "$(env_of '["nodejs","python3","nodejs"]')" = "$e" ] || fail "names are not normalised"
echo "ok   env names sorted and de-duplicated"

if env_of '["gcc","nosuch","python3Packages.numpy","busybox.meta"]' >/dev/null 2>&1; then fail "unknown names accepted"; fi
grep -q 'unknown package attribute(s): nosuch, python3Packages.numpy' "$tmp/log" \
  && grep -q 'not a package (no derivation): busybox.meta' "$tmp/log" || { cat "$tmp/log"; fail "unknown-name message"; }
echo "ok   unknown names rejected: $(grep -o 'cellblock-env:.*' "$tmp/log")"

if build "$here" -A broken-example >/dev/null 2>&1; then fail "broken-example built"; fi
grep -q 'always fails to build' "$tmp/log" || fail "broken-example log"
echo "ok   broken-example fails with its log"

# Dotted names, include/lib/pkgconfig dirs and propagated inputs, with a fixture channel that
# extends this one. (The channel path in this fixture is test code, not a package name.)
cat > "$tmp/default.nix" <<EOF
{ ... }:
let
  real = import $here { };
  mk = name: script: derivation {
    inherit name; system = builtins.currentSystem; PATH = "\${real.busybox}/bin";
    builder = "\${real.busybox}/bin/busybox"; args = [ "sh" "-euc" script ];
  };
  dep = mk "dep-1.0" "mkdir -p \$out/bin \$out/lib/python3.11/site-packages";
in real // {
  sub.lib = mk "lib-2.0" "mkdir -p \$out/include \$out/lib/pkgconfig \$out/nix-support; echo \${dep} > \$out/nix-support/propagated-build-inputs";
}
EOF
e=$(env_of '["sub.lib"]' "$tmp")
json "$e/env.json" '" ".join(sorted(d))' | grep -qx 'CPATH LIBRARY_PATH PATH PKG_CONFIG_PATH PYTHONPATH' \
  || fail "fixture env.json: $(cat "$e/env.json")"
echo "ok   dotted name, search paths, propagated inputs"

env -u NIX_BUILD_SHELL nix-shell -I nixpkgs="$here" -p busybox --run 'type tr' </dev/null 2>"$tmp/log" | grep -q busybox \
  || { cat "$tmp/log"; fail "nix-shell -p busybox"; }
echo "ok   nix-shell -I nixpkgs=channel -p busybox"
echo "all checks passed"
