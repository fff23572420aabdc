"""Reports and benchmarks: collect studies, render tables and plots, measure what pruning costs and buys."""
