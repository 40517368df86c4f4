"""When a cache pays: a cost model measured on this machine, and the per-request guard that uses it."""
