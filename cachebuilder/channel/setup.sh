#!/bin/sh
# Writes versions.json next to default.nix: the versions of the host tools this channel exposes,
# read from the tools themselves, so that versions are known at evaluation time (package index,
# derivation names) without building anything. Run once after checkout and again after the host's
# packages change (a host-tool build refuses a stale versions.json). Cheap: ~0.2 s.
# Usage: sh setup.sh [HOST_BIN_DIR]   (default /usr/bin; never $PATH, which may hold pyenv shims etc.)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
bin=${1:-/usr/bin}
case $bin in /*) ;; *) echo "setup.sh: host bin dir must be absolute" >&2; exit 2 ;; esac
[ -x "$bin/busybox" ] || { echo "setup.sh: $bin/busybox is missing (apt-get install busybox-static); every build needs it" >&2; exit 1; }

tmp=$(mktemp "$here/.versions.json.XXXXXX")
trap 'rm -f "$tmp"' EXIT
{
  printf '{\n  "hostBin": "%s",\n  "versions": {' "$bin"
  sep=
  for tool in busybox bash coreutils gcc python3 nodejs; do
    v=$(sh "$here/builders/host-version.sh" "$tool" "$bin" 2>/dev/null) || v=
    # The value ends up in JSON, a derivation name and a store path: allow only a plain version.
    if ! printf '%s' "$v" | grep -Eq '^[0-9][0-9A-Za-z.+~_-]*$'; then
      echo "setup.sh: warning: no usable $tool in $bin (got '$v'); the channel will not offer it" >&2
      continue
    fi
    printf '%s\n    "%s": "%s"' "$sep" "$tool" "$v"
    sep=,
  done
  printf '\n  }\n}\n'
} > "$tmp"
chmod 644 "$tmp"
mv "$tmp" "$here/versions.json"
trap - EXIT
cat "$here/versions.json"
