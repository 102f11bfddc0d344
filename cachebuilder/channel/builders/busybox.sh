# Builder of `busybox`: the host's static busybox copied into $out/bin with one symlink per applet.
# It needs nothing outside its own store path, so it works in a "pure" sandbox.
# Env: bootstrap (store dir holding `busybox`), probe, version.
found=$(sh "$probe" busybox "$bootstrap")
if [ "$found" != "$version" ]; then
  echo "busybox: the host's busybox is '$found' but versions.json says '$version'; re-run setup.sh" >&2
  exit 1
fi
mkdir -p "$out/bin" "$out/nix-support"
cp "$bootstrap/busybox" "$out/bin/busybox"
for applet in $("$out/bin/busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$out/bin/$applet"
done
echo "$version" > "$out/nix-support/version"
