"""Code generation for kernel groups, per target."""
