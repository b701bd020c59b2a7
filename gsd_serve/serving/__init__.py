"""Serving: the draft and target workers, the router that drives each request's decode loop over gRPC,
the OpenAI-compatible and gRPC frontends, the Redis prefix cache, and the Serve configs; the Ray Serve
deployments over them are the sibling package gsd_serve.services (the same layer).

May import gsd_serve.core and gsd_serve.models, Ray, gRPC and Redis. Never imports gsd_serve.training,
gsd_serve.tools or gsd_serve.cli.
The gRPC stubs in _generated/ are generated (protogen.py), never edited.
"""
