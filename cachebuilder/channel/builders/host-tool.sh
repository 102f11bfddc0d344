# Builder of a "host toolchain exposed as a package": $out/bin holds symlinks to the host's own
# binaries (symlinks, not wrapper scripts: no extra exec, and gcc/python find their libexec and
# prefix through /proc/self/exe or by resolving the link). Usable only where the host's /usr and
# /lib are visible, i.e. the sandbox's "host" base mode.
# Env: pname, version, hostBin, probe, links ("name=target ...", the first one is required).
found=$(sh "$probe" "$pname" "$hostBin") || found=
if [ -z "$found" ]; then
  echo "$pname: could not run $pname from $hostBin (Nix sandbox on? host tools need sandbox = false or relaxed)" >&2
  exit 1
elif [ "$found" != "$version" ]; then
  echo "$pname: the host's $pname is '$found' but versions.json says '$version'; re-run setup.sh" >&2
  exit 1
fi
mkdir -p "$out/bin" "$out/nix-support"
required=1
for link in $links; do
  name=${link%%=*} target=$hostBin/${link#*=}
  if [ -e "$target" ]; then
    ln -s "$target" "$out/bin/$name"
  elif [ $required = 1 ]; then
    echo "$pname: $target does not exist" >&2
    exit 1
  fi
  required=0
done
echo "$version" > "$out/nix-support/version"
