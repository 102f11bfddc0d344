# Prints the version of one host tool, read from the tool itself.
# Usage: sh host-version.sh TOOL BINDIR
# Used by setup.sh (to write versions.json) and by every host-tool build (to refuse a stale
# versions.json), so both read the version the same way. Runs under the host sh or busybox sh.
tool=$1 bin=$2
case $tool in
  busybox)   "$bin/busybox" 2>&1 | sed -n '1s/^BusyBox v\([^ ]*\) .*/\1/p' ;;
  bash)      "$bin/bash" --norc --noprofile -c 'echo "${BASH_VERSINFO[0]}.${BASH_VERSINFO[1]}.${BASH_VERSINFO[2]}"' ;;
  coreutils) "$bin/ls" --version | sed -n '1s/.* //p' ;;
  gcc)       "$bin/gcc" -dumpfullversion ;;
  python3)   "$bin/python3" -I -c 'import platform; print(platform.python_version())' ;;
  nodejs)    "$bin/node" -p 'process.versions.node' ;;
  *)         echo "host-version.sh: unknown tool '$tool'" >&2; exit 2 ;;
esac
