"""One module per bench; see experiments/bench.py for the contract."""
