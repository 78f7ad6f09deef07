"""Opening models: what a path or Hub id is, the Hub, run folders read back, model cards."""
