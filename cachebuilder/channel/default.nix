# Cellblock's bundled offline channel: `import ./. { }` is an attrset of packages, like nixpkgs.
# Nothing can be fetched here (no binary cache, no nixpkgs, no stdenv), so every package is a plain
# builtins.derivation whose builder is the host's static busybox, copied into the store.
# Host versions come from versions.json, written by setup.sh (see README.md).
{ system ? builtins.currentSystem, ... }: # `...`: nix-shell passes inNixShell = true
let
  versionsFile = ./versions.json;
  host =
    if builtins.pathExists versionsFile then builtins.fromJSON (builtins.readFile versionsFile)
    else throw "cellblock channel: ${toString versionsFile} is missing; run ${toString ./setup.sh} first";
  hostBin = host.hostBin;

  # The store path must be a *directory* holding a file named `busybox`: busybox picks its applet
  # from argv[0]'s basename, and Nix runs a builder with argv[0] = the builder's basename, so a file
  # copied to /nix/store/<hash>-busybox fails with "applet not found". Content-addressed: a new
  # host busybox gives a new path and rebuilds everything.
  bootstrap = builtins.path {
    name = "busybox-bootstrap";
    path = /. + hostBin;
    filter = path: _type: baseNameOf path == "busybox";
  };
  probe = ./builders/host-version.sh;

  # builtins.derivation plus the attributes nixpkgs tools expect (pname, version, meta). meta is
  # added after the fact because a derivation's arguments must be strings, not attrsets.
  mkPackage = { pname, version, builder, description, requiresHostBase, env ? { } }:
    derivation ({
      inherit system pname version;
      name = "${pname}-${version}";
      builder = "${bootstrap}/busybox";
      # busybox ash here runs applets (mkdir, ln, sed...) without a PATH.
      args = [ "sh" "-eu" builder ];
    } // env) // {
      meta = { inherit description requiresHostBase; };
    };

  hostTool = pname: { description, links }: mkPackage {
    inherit pname description;
    version = host.versions.${pname};
    builder = ./builders/host-tool.sh;
    requiresHostBase = true;
    # Reads the host's /usr: impure by design. Ignored with sandbox = false (Debian's default);
    # with sandbox = relaxed only these builds leave the sandbox.
    env = { inherit hostBin probe; links = toString links; __noChroot = true; };
  };

  # Host tools the host lacks (setup.sh left them out of versions.json) are not offered at all.
  hostTools = builtins.mapAttrs hostTool (builtins.intersectAttrs host.versions {
    bash = {
      description = "GNU Bourne Again SHell (the host's, exposed as a package)";
      links = [ "bash=bash" ];
    };
    coreutils = {
      description = "GNU core utilities (the host's, exposed as a package)";
      links = map (n: "${n}=${n}") [
        "ls" "[" "arch" "b2sum" "base32" "base64" "basename" "basenc" "cat" "chcon" "chgrp" "chmod"
        "chown" "cksum" "comm" "cp" "csplit" "cut" "date" "dd" "df" "dir" "dircolors" "dirname" "du"
        "echo" "env" "expand" "expr" "factor" "false" "fmt" "fold" "groups" "head" "hostid" "id"
        "install" "join" "link" "ln" "logname" "md5sum" "mkdir" "mkfifo" "mknod" "mktemp" "mv"
        "nice" "nl" "nohup" "nproc" "numfmt" "od" "paste" "pathchk" "pinky" "pr" "printenv"
        "printf" "ptx" "pwd" "readlink" "realpath" "rm" "rmdir" "runcon" "seq" "sha1sum"
        "sha224sum" "sha256sum" "sha384sum" "sha512sum" "shred" "shuf" "sleep" "sort" "split"
        "stat" "stdbuf" "stty" "sum" "sync" "tac" "tail" "tee" "test" "timeout" "touch" "tr" "true"
        "truncate" "tsort" "tty" "uname" "unexpand" "uniq" "unlink" "users" "vdir" "wc" "who"
        "whoami" "yes"
      ];
    };
    gcc = {
      description = "GNU C/C++ compiler with binutils (the host's, exposed as a package)";
      # gcc runs `as` and `ld` through PATH, so binutils come along.
      links = map (n: "${n}=${n}") [
        "gcc" "cc" "g++" "c++" "cpp" "gcc-ar" "gcc-nm" "gcc-ranlib" "gcov" "as" "ld" "ld.bfd"
        "ld.gold" "ar" "nm" "ranlib" "objdump" "objcopy" "strip" "readelf" "size" "strings"
      ];
    };
    python3 = {
      description = "Python 3 interpreter (the host's, exposed as a package)";
      links = [ "python3=python3" "python=python3" "pip3=pip3" "pydoc3=pydoc3" ];
    };
    nodejs = {
      description = "Node.js JavaScript runtime with npm (the host's, exposed as a package)";
      links = [ "node=node" "nodejs=node" "npm=npm" "npx=npx" ];
    };
  });

  packages = hostTools // {
    busybox = mkPackage {
      pname = "busybox";
      version = host.versions.busybox;
      builder = ./builders/busybox.sh;
      description = "Static BusyBox: sh and ~270 Unix utilities in one binary, needs nothing else";
      requiresHostBase = false;
      env = { inherit bootstrap probe; };
    };

    # Always fails to build, with a message on stderr: for tests of build-failure handling.
    broken-example = mkPackage {
      pname = "broken-example";
      version = "1.0";
      builder = builtins.toFile "broken-example.sh" ''
        echo "broken-example: this package always fails to build (on purpose, for tests)" >&2
        exit 1
      '';
      description = "A package whose build always fails, for tests";
      requiresHostBase = false;
    };

    # A build that takes two seconds and is new at every evaluation (the time is one of its
    # inputs): for tests of builds that are in progress, e.g. a builder killed mid-build.
    slow-example = mkPackage {
      pname = "slow-example";
      version = "1.0";
      builder = builtins.toFile "slow-example.sh" ''
        echo "slow-example: building for 2 s" >&2
        sleep 2
        mkdir -p "$out/bin"
        echo "built at $stamp" > "$out/stamp"
      '';
      description = "A package that takes two seconds to build, anew each time, for tests";
      requiresHostBase = false;
      env = { stamp = toString builtins.currentTime; };
    };
  };

  # Just enough of nixpkgs' interface for `nix-shell -I nixpkgs=<this dir> -p NAME...`, which
  # evaluates `with import <nixpkgs> { }; (pkgs.runCommandCC or pkgs.runCommand) "shell"
  # { buildInputs = [ NAME ]; } ""`, sources $stdenv/setup and runs bashInteractive's bash.
  # Not packages of their own: env.nix refuses the functions, index.nix skips them and the alias.
  nixShellSupport = rec {
    pkgs = packages // nixShellSupport;
    runCommand = name: env: buildCommand: derivation (env // {
      inherit name system buildCommand;
      builder = "${packages.busybox}/bin/busybox";
      args = [ "sh" "-euc" ''eval "$buildCommand"'' ];
      stdenv = ./shell-setup;
    });
    runCommandCC = runCommand;
    bashInteractive = packages.bash or (throw "cellblock channel: the host has no bash");
  };
in
packages // nixShellSupport
