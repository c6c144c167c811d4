# Sourced by the scripts beside it: BENCH is `glimpseprune bench` once the CLI has the subcommand, else the module.
if glimpseprune bench --help >/dev/null 2>&1; then
  BENCH=(glimpseprune bench)
else
  BENCH=(python -m glimpseprune.bench.report bench)
fi
