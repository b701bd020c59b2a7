"""Serving: the draft and target workers, the router that drives each request's decode loop over gRPC,
the OpenAI-compatible and gRPC frontends, the Redis prefix cache, and the Ray Serve deployments
(gsd_serve.services, kept at the repository's top-level services/).

May import gsd_serve.core and gsd_serve.models, Ray, gRPC and Redis. Never imports gsd_serve.cli.
The gRPC stubs in _generated/ are generated (protogen.py), never edited.
"""
