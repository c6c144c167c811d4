# Sourced by the scripts beside it: BENCH is `glimpseprune bench`, or the same command through the module where no
# `glimpseprune` executable is on PATH (a venv not activated, the device machine's shim-less runs).
if glimpseprune bench --help >/dev/null 2>&1; then
  BENCH=(glimpseprune bench)
else
  BENCH=(python -m glimpseprune.bench.report bench)
fi
