"""The paper's comparisons at small scale (`terdit reproduce`: variants, runner, evaluation, claims, plots,
report) and the activation analyses (`terdit analyze`: analysis)."""
