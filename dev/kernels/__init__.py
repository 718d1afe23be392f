"""The kernel library: llm.c's dev/cuda in Triton. One module per op with numbered versions,
simplest to fastest, and one harness that validates each against a float64 reference before
it times it (python -m dev.kernels.harness). See README.md beside this file."""
