"""The paper's comparisons at small scale and the activation analyses."""
