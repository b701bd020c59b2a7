"""The core of GSD: the token graph, drafting, lookup proposals, flattening, acceptance, sampling, caches,
the cost model and the planner that decides each round, the decode loop (one round, written once) and the
in-process engine that drives it.

May import torch and transformers' cache base class. Never imports gsd_serve.models, gsd_serve.serving or
gsd_serve.cli, nor Ray, gRPC or Redis: models reach the core through the runner interface (runner.py).
"""
