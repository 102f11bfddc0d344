# One environment derivation for a set of package attribute names, validated in one evaluation:
#   nix-build env.nix --argstr channel /path/to/channel --argstr namesJson '["gcc","python3"]'
#   nix-build env.nix --argstr channel /path/to/channel --argstr namesFile /path/to/names.json
# Names travel as JSON data, never as Nix source. Dotted names (python3Packages.numpy) are looked
# up level by level. Meant for this offline channel or a nixpkgs checkout (anything whose
# `import channel { }` is an attrset of derivations that includes `busybox`; nixpkgs is untested).
# Output: $out/env.json, $out/packages.json, $out/closure.json (see README.md).
{ channel ? ./., namesJson ? null, namesFile ? null }:
let
  inherit (builtins) attrNames concatLists concatStringsSep filter genList head isAttrs isList
    isString length listToAttrs map match split tail toJSON;

  pkgs = import channel { };

  raw =
    if namesJson != null then builtins.fromJSON namesJson
    else if namesFile != null then builtins.fromJSON (builtins.readFile namesFile)
    else throw "cellblock-env: pass --argstr namesJson '[...]' or --argstr namesFile FILE";

  # Sorted and de-duplicated, so the same set always gives the same derivation.
  names =
    if isList raw && raw != [ ] && builtins.all isString raw
    then attrNames (listToAttrs (map (n: { name = n; value = null; }) raw))
    else throw "cellblock-env: the names must be a non-empty JSON list of strings, got ${toJSON raw}";

  # Defence in depth; the caller validates names too.
  wellFormed = n: match "[A-Za-z_][A-Za-z0-9_+-]*([.][A-Za-z_][A-Za-z0-9_+-]*)*" n != null;

  # Hand-written lib.attrByPath: { found = bool; value = ...; }. `?` does not force the value, so
  # an unknown name is reported without evaluating anything else.
  lookup = name:
    let
      go = set: path:
        if path == [ ] then { found = true; value = set; }
        else if isAttrs set && set ? ${head path} then go set.${head path} (tail path)
        else { found = false; };
    in go pkgs (filter isString (split "[.]" name));

  resolved = map (n: { name = n; malformed = !wellFormed n; }
    // (if wellFormed n then lookup n else { found = false; })) names;
  isDrv = v: isAttrs v && (v.type or null) == "derivation";
  bad = filter (r: !r.found || !isDrv r.value) resolved;
  badNames = kind: map (r: r.name) (filter kind bad);
  malformed = badNames (r: r.malformed);
  unknown = badNames (r: !r.found && !r.malformed);
  notPackages = badNames (r: r.found);

  describe = what: list:
    if list == [ ] then [ ] else [ "${what}: ${concatStringsSep ", " list}" ];
  # One message naming every bad name; the JSON tail is for programs to parse.
  failure = "cellblock-env: "
    + concatStringsSep "; " (describe "unknown package attribute(s)" unknown
      ++ describe "not a package (no derivation)" notPackages
      ++ describe "malformed name(s)" malformed)
    + " (channel ${toString channel}) "
    + toJSON { unknown_packages = unknown; not_packages = notPackages; malformed_names = malformed; };

  packages = if bad == [ ] then map (r: r.value // { attr = r.name; }) resolved else throw failure;

  outputNames = p: p.outputs or [ "out" ];
  outputs = concatLists (map (p: map (o: p.${o}) (outputNames p)) packages);

  packagesJson = toJSON (map (p:
    let parsed = builtins.parseDrvName p.name; in {
      inherit (p) attr name;
      pname = p.pname or parsed.name;
      version = p.version or parsed.version;
      store_path = p.outPath;
      outputs = listToAttrs (map (o: { name = o; value = p.${o}.outPath; }) (outputNames p));
      description = p.meta.description or null;
      requires_host_base = p.meta.requiresHostBase or false;
    }) packages);

  busybox = pkgs.busybox or (throw "cellblock-env: channel ${toString channel} has no busybox to build with");
in
derivation {
  name = "cellblock-env";
  system = builtins.currentSystem;
  builder = "${busybox}/bin/busybox";
  args = [ "sh" "-eu" ./builders/env.sh ];
  PATH = "${busybox}/bin";
  outputPaths = outputs;
  inherit packagesJson;
  passAsFile = [ "packagesJson" ];
  # Writes a file graph<i> into the build directory listing the runtime closure of output i.
  exportReferencesGraph = concatLists (genList (i: [ "graph${toString i}" (builtins.elemAt outputs i) ]) (length outputs));
}
