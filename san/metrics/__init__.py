"""Prometheus metrics: per-vdisk I/O counted in C in each map table, pool, fault, grant, store and gateway figures,
all read at scrape time by the collectors here and served as /metrics on the API and on each gateway."""
