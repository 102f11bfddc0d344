# Builder of env.nix. Env: outputPaths (the requested packages' outputs), packagesJsonPath,
# graph0..graphN in the build directory (exportReferencesGraph). PATH is busybox's bin.
mkdir -p "$out"
cp "$packagesJsonPath" "$out/packages.json"

# Like stdenv's setup: also take in what packages propagate (nixpkgs records these in
# nix-support/); the offline channel's packages propagate nothing.
inputs= seen=' '
visit() {
  local p f
  case $seen in *" $1 "*) return 0 ;; esac
  seen="$seen$1 " inputs="$inputs $1"
  for f in propagated-build-inputs propagated-user-env-packages; do
    [ -f "$1/nix-support/$f" ] || continue
    for p in $(cat "$1/nix-support/$f"); do visit "$p"; done
  done
}
for p in $outputPaths; do visit "$p"; done

# Search paths from the directories the inputs have, in input order (env.nix sorts the names, so
# with two packages providing one command, the alphabetically first attribute wins).
PATH_= CPATH_= LIBRARY_PATH_= PKG_CONFIG_PATH_= PYTHONPATH_= NODE_PATH_=
add() { eval "$1=\${$1:+\$$1:}\$2"; }
for p in $inputs; do
  [ -d "$p/bin" ] && add PATH_ "$p/bin"
  [ -d "$p/include" ] && add CPATH_ "$p/include"
  [ -d "$p/lib" ] && add LIBRARY_PATH_ "$p/lib"
  for d in "$p/lib/pkgconfig" "$p/share/pkgconfig" "$p"/lib/python3*/site-packages; do
    case $d in *pkgconfig) v=PKG_CONFIG_PATH_ ;; *) v=PYTHONPATH_ ;; esac
    [ -d "$d" ] && add $v "$d"
  done
  [ -d "$p/lib/node_modules" ] && add NODE_PATH_ "$p/lib/node_modules"
done

# Store paths contain no character that needs escaping in JSON.
sep=
{
  printf '{'
  for v in PATH CPATH LIBRARY_PATH PKG_CONFIG_PATH PYTHONPATH NODE_PATH; do
    eval "val=\$${v}_"
    if [ -n "$val" ]; then printf '%s"%s": "%s"' "$sep" "$v" "$val"; sep=', '; fi
  done
  printf '}\n'
} > "$out/env.json"

# A graph file holds records: path, deriver (empty), reference count, that many references.
# The closure of $out is $out plus the closures of the outputs it names (its files mention them).
{
  echo "$out"
  for g in graph*; do
    awk 'st == 0 { print; st = 1; next }
         st == 1 { st = 2; next }
         st == 2 { n = $0 + 0; st = n > 0 ? 3 : 0; next }
         { if (--n == 0) st = 0 }' "$g"
  done
} | sort -u | awk 'BEGIN { printf "[" } { printf "%s\"%s\"", (NR > 1 ? ", " : ""), $0 } END { print "]" }' > "$out/closure.json"
