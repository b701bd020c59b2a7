"""Ray Serve deployments of gsd-serve: thin adapters over gsd_serve.workers / router / openai_api.

services.app:build_app is the import path of the Serve application (deploy/*.yaml).
"""
