# The channel's package index, evaluated without building anything:
#   nix-instantiate --eval --strict --json index.nix --argstr channel /path/to/channel
# (the --argstr is needed even for this directory: without an --arg, --eval does not call a function)
# Lists every attribute that is a derivation under its own name (skipping helpers like runCommand
# and aliases like bashInteractive, whose pname differs from the attribute name).
{ channel ? ./. }:
let
  pkgs = import channel { };
  isPackage = n: let p = pkgs.${n}; in
    builtins.isAttrs p && (p.type or null) == "derivation" && (p.pname or null) == n;
in
map (n: let p = pkgs.${n}; in {
  attr = n;
  inherit (p) name pname version;
  description = p.meta.description;
  requires_host_base = p.meta.requiresHostBase;
}) (builtins.filter isPackage (builtins.attrNames pkgs))
