"""Cache builders: turn package sets into cached Nix environments; the offline channel."""
